// Stand-in (see ../README.md): held by pointer; the one member an inline method of ProcessGroupGloo names
// is declared (never called by tpp).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
