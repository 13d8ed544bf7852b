// Declaration-only stand-in (see gloo/algorithm.h). ProcessGroupGloo.hpp's
// inline setTimeout names this member; that function is never emitted here
// (the class's virtual table lives in libtorch_cpu.so).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
