// Small C++ shim for libtorch features that tch 0.24 does not expose.
// Every entry point catches C++ exceptions: an exception must never cross into Rust.
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>
#include <cstdio>
#include <vector>

extern "C" {

// Enters an autocast region for a device type (0 = CPU, 1 = CUDA; CUDA in bf16), on or (enabled = 0) off,
// as torch.autocast does, through the device-typed API: the untyped at::autocast::is_enabled /
// set_enabled that tch::autocast calls are deprecated in libtorch 2.11 and print a warning on every call.
// Returns the previous enabled state (0 or 1), or -1 on failure.
int tpp_autocast_enter(int device_type, int enabled) {
  try {
    auto dt = static_cast<c10::DeviceType>(device_type);
    at::autocast::set_autocast_dtype(dt, at::kBFloat16);
    bool prev = at::autocast::is_autocast_enabled(dt);
    at::autocast::set_autocast_enabled(dt, enabled != 0);
    at::autocast::increment_nesting();
    return prev ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Leaves what tpp_autocast_enter entered, restoring the previous state; the cast-weight cache is cleared
// when the outermost autocast region ends.
int tpp_autocast_exit(int device_type, int prev) {
  try {
    auto dt = static_cast<c10::DeviceType>(device_type);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dt, prev != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Is autocast on for a device type (1/0; -1 on failure)? For tests.
int tpp_autocast_enabled(int device_type) {
  try {
    return at::autocast::is_autocast_enabled(static_cast<c10::DeviceType>(device_type)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Peak bytes allocated by the caching allocator on a device, or -1 when unavailable (no CUDA).
int64_t tpp_cuda_peak_allocated(int device) {
  try {
    auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (alloc == nullptr) return -1;
    auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  } catch (...) {
    return -1;
  }
}

int tpp_cuda_reset_peak(int device) {
  try {
    auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (alloc == nullptr) return -1;
    alloc->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
}

// libtorch's (Kineto) profiler around a stretch of a run, for `--profile-trace`: every operator on the
// CPU (and CUDA kernels when `cuda`), saved as a Chrome trace. 0 on success, -1 on failure.
#include <torch/csrc/autograd/profiler_kineto.h>

extern "C" {

int tpp_trace_start(int cuda) {
  try {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> acts{ActivityType::CPU};
    if (cuda != 0) acts.insert(ActivityType::CUDA);
    torch::profiler::impl::ProfilerConfig cfg(torch::profiler::impl::ProfilerState::KINETO, true);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
    return 0;
  } catch (...) {
    return -1;
  }
}

int tpp_trace_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) return -1;
    result->save(path);
    return 0;
  } catch (...) {
    return -1;
  }
}
}

// Optimiser support: gradients reset to undefined (PyTorch's zero_grad(set_to_none=True): the next
// backward writes fresh gradients instead of adding into zeroed ones), and one fused AdamW update over
// a group of parameters (libtorch's _fused_adamw_, CPU and CUDA kernels; PyTorch's AdamW(fused=True)).
#include <ATen/ops/_fused_adamw.h>

extern "C" {

int tpp_grad_reset(void* tensor) {
  try {
    static_cast<at::Tensor*>(tensor)->mutable_grad().reset();
    return 0;
  } catch (...) {
    return -1;
  }
}

// `n` parameters with their gradients and moments (same dtype and device each), AdamW step number `step`
// (1-based, after this update's increment). Returns 0, or -1 on failure (message in `err`).
int tpp_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs, size_t n, double lr,
                    double beta1, double beta2, double weight_decay, double eps, int64_t step, char* err,
                    size_t err_len) {
  try {
    if (n == 0) return 0;
    std::vector<at::Tensor> p, g, m, v, steps;
    for (size_t i = 0; i < n; ++i) {
      p.push_back(*static_cast<at::Tensor*>(params[i]));
      g.push_back(*static_cast<at::Tensor*>(grads[i]));
      m.push_back(*static_cast<at::Tensor*>(exp_avgs[i]));
      v.push_back(*static_cast<at::Tensor*>(exp_avg_sqs[i]));
    }
    // The kernels read the step count from a tensor per parameter (float32, on the parameters' device).
    auto s = at::full({}, static_cast<double>(step), at::TensorOptions().dtype(at::kFloat).device(p[0].device()));
    steps.assign(n, s);
    at::NoGradGuard no_grad;
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::snprintf(err, err_len, "%s", e.what());
    }
    return -1;
  } catch (...) {
    return -1;
  }
}
}
