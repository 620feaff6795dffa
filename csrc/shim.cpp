// Small C++ shim for libtorch features that tch 0.24 does not expose.
// Every entry point catches C++ exceptions: an exception must never cross into Rust.
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

extern "C" {

// Enters an autocast region for a device type (0 = CPU, 1 = CUDA; CUDA in bf16), on or (enabled = 0) off,
// as torch.autocast does, through the device-typed API: the untyped at::autocast::is_enabled /
// set_enabled that tch::autocast calls are deprecated in libtorch 2.11 and print a warning on every call.
// Returns the previous enabled state (0 or 1), or -1 on failure.
int tpp_autocast_enter(int device_type, int enabled) {
  try {
    auto dt = static_cast<c10::DeviceType>(device_type);
    if (dt == c10::DeviceType::CUDA) at::autocast::set_autocast_dtype(dt, at::kBFloat16);
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
