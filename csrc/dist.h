// Shared by dist.cpp and dist_nccl.cpp.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <chrono>
#include <cstddef>
#include <exception>

// A process group and the timeout of its collectives.
struct TppGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

// Copies `what` into the caller's buffer (truncated, NUL-terminated).
void tpp_dist_set_error(char* err, size_t len, const char* what);

// Runs `f`; a C++ exception becomes its message in `err` and the result `failed` (an exception must never
// cross into Rust).
template <class R, class F>
R tpp_dist_guard(char* err, size_t len, R failed, F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    tpp_dist_set_error(err, len, e.what());
  } catch (...) {
    tpp_dist_set_error(err, len, "unknown C++ exception");
  }
  return failed;
}
