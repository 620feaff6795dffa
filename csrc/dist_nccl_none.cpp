// Stands in for dist_nccl.cpp where libtorch has no CUDA or the NCCL / CUDA headers are missing.
#include <cstddef>
#include <cstdint>

#include "dist.h"

extern "C" {

int tpp_dist_nccl_built(void) { return 0; }

void* tpp_dist_nccl(void*, int, int, int, int64_t, char* err, size_t len) {
  tpp_dist_set_error(err, len, "this tpp was built without NCCL (a CUDA libtorch and the NCCL headers are needed)");
  return nullptr;
}

}  // extern "C"
