// Shared by dist.cpp and dist_nccl.cpp.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <chrono>
#include <cstddef>

// A process group and the timeout of its collectives.
struct TppGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

// Copies `what` into the caller's buffer (truncated, NUL-terminated).
void tpp_dist_set_error(char* err, size_t len, const char* what);
