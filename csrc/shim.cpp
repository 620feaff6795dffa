// Small C++ shim for libtorch features that tch 0.24 does not expose.
// Every entry point catches C++ exceptions: an exception must never cross into Rust.
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

extern "C" {

// tch::autocast uses PyTorch's default CUDA autocast dtype (fp16); we want bf16.
// Returns 0 on success.
int tpp_set_cuda_autocast_bf16(int enable_bf16) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, enable_bf16 ? at::kBFloat16 : at::kHalf);
    return 0;
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
