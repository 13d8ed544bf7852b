// Declaration-only stand-in for gloo's header, which the torch wheel does not
// ship although ProcessGroupGloo.hpp includes it. vggctl never touches a gloo
// type: gloo itself is linked statically inside libtorch_cpu.so, and only the
// names the c10d header mentions need to exist (see src/shim_dist.cpp).
#pragma once
#include "gloo/context.h"
