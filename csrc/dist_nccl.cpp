// NCCL process groups (CUDA tensors). Compiled only where libtorch_cuda and the NCCL / CUDA headers exist
// (see build.rs); elsewhere dist_nccl_none.cpp answers that NCCL is not built in.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdint>

#include "dist.h"

extern "C" {

int tpp_dist_nccl_built(void) { return 1; }

// An NCCL process group over `store` on CUDA device `device` (made current for this process).
void* tpp_dist_nccl(void* store, int rank, int world, int device, int64_t timeout_ms, char* err, size_t len) {
  return tpp_dist_guard<void*>(err, len, nullptr, [&]() -> void* {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    c10::intrusive_ptr<c10d::Backend> pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, world, opts);
    return new TppGroup{pg, timeout};
  });
}

}  // extern "C"
