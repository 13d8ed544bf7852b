// PyTorch's c10d from C: a TCPStore rendezvous and a Gloo (host memory) or
// NCCL (the rank's GPU) process group with the collectives data-parallel
// training needs (all-reduce, broadcast, barrier). The one Rust caller is
// src/shim/dist.rs.
//
// NCCL is compiled in when build.rs finds its headers (VGGCTL_NCCL, with
// USE_C10D_NCCL, without which ProcessGroupNCCL.hpp declares nothing);
// ProcessGroupNCCL itself is in libtorch_cuda.so.
//
// Compiled with USE_C10D_GLOO (without it ProcessGroupGloo.hpp declares
// nothing) against the stand-in gloo headers in src/gloo-stubs: the wheel
// ships no gloo headers, and nothing here touches a gloo type (gloo is
// linked statically inside libtorch_cpu.so).
//
// As in src/shim.cpp, every function catches C++ exceptions (`guarded`,
// src/shim.h): an error comes back as a non-zero status with its message
// copied into `err`.
#include "shim.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/custom_function.h>
#ifdef VGGCTL_CUDA
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>
#endif
#ifdef VGGCTL_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using vggctl_shim::guarded;

struct Group {
  // The group's own keys in the launcher's or rank 0's TCPStore.
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  // Gloo's tensors are host tensors; NCCL's are on the rank's GPU.
  bool on_host;

  std::mutex lock;  // guards pg, which close() may end from any thread

  // The backend, while the group is open (see close); a collective
  // running on another thread keeps it alive until it returns.
  c10::intrusive_ptr<c10d::Backend> backend() {
    std::lock_guard<std::mutex> hold(lock);
    if (!pg) throw std::runtime_error("the group was closed after a failed collective");
    return pg;
  }

  // Ends the backend: its connections close, so that peers blocked in a
  // collective with this rank fail at once instead of at their timeout.
  // NCCL's is shut down first, as torch.distributed.destroy_process_group
  // does; a failure there changes nothing for a rank that is ending.
  void close() {
    c10::intrusive_ptr<c10d::Backend> ended;
    {
      std::lock_guard<std::mutex> hold(lock);
      ended = std::move(pg);
    }
    if (ended && !on_host) {
      try {
        ended->shutdown();
      } catch (...) {
      }
    }
  }
};

// The network device Gloo binds to, chosen as PyTorch does: the interfaces
// in GLOO_SOCKET_IFNAME, else this host's address. A group whose store is on
// the loopback address is one machine, so it binds there too (a hostname
// that resolves to an outside address would otherwise be used).
std::vector<std::shared_ptr<gloo::transport::Device>> devices(const std::string &host) {
  std::vector<std::shared_ptr<gloo::transport::Device>> out;
  if (const char *names = std::getenv("GLOO_SOCKET_IFNAME"); names && *names) {
    std::stringstream ss(names);
    std::string name;
    while (std::getline(ss, name, ',')) {
      if (!name.empty()) out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
    return out;
  }
  if (host == "localhost" || host.rfind("127.", 0) == 0) {
    out.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    out.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return out;
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp::MAX;
    case 2:
      return c10d::ReduceOp::MIN;
    default:
      return c10d::ReduceOp::SUM;
  }
}

// `x` summed over the ranks, as a new tensor on x's device (through a host
// copy for Gloo, which works on host memory).
at::Tensor sum_across(Group *g, const at::Tensor &x) {
  auto at = g->on_host ? at::Device(at::kCPU) : x.device();
  auto copy = x.detach().to(at, /*non_blocking=*/false, /*copy=*/true).contiguous();
  std::vector<at::Tensor> v{copy};
  g->backend()->allreduce(v)->wait();
  return copy.to(x.device());
}

// The group's backend: Gloo when `cuda_device` is negative, else NCCL on
// that GPU (made the current device, bound to the group, and connected
// now, so that a failed rendezvous fails here, within the timeout).
c10::intrusive_ptr<c10d::Backend> backend(const c10::intrusive_ptr<c10d::Store> &store,
                                          const std::string &host, int rank, int world,
                                          int cuda_device, std::chrono::milliseconds timeout) {
  if (cuda_device < 0) {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices = devices(host);
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
  }
#ifdef VGGCTL_NCCL
  auto device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device));
  c10::cuda::set_device(device.index());
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
  pg->setBoundDeviceId(device);
  pg->eagerConnectSingleDevice(device);
  return pg;
#else
  throw std::runtime_error("this vggctl is built without NCCL");
#endif
}

// A differentiable sum over the ranks: forward sums the ranks' values, and
// backward sums the ranks' gradients (each rank's input influenced every
// rank's output). SyncBatchNorm's statistics go through it.
struct SumAcross : public torch::autograd::Function<SumAcross> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            int64_t group) {
    ctx->saved_data["group"] = group;
    return sum_across(reinterpret_cast<Group *>(group), x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto *g = reinterpret_cast<Group *>(ctx->saved_data["group"].toInt());
    return {sum_across(g, grads[0]), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Joins the group of `world` processes whose TCPStore is at host:port: as
// its server when `serve` (rank 0 without a launcher's store), else as a
// client. Keys go under `prefix`, clear of a launcher's own. Every wait,
// the store's and the collectives', is bounded by `timeout_ms`. Gloo when
// `cuda_device` is negative, else NCCL on that GPU.
int vggctl_dist_new(const char *host, int port, int rank, int world, int serve,
                    const char *prefix, int64_t timeout_ms, int cuda_device, void **out,
                    char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
    // c10d logs each failure with a stack trace on stderr before throwing
    // it; the exception's message reaches the user as vggctl's one error
    // line. TORCH_CPP_LOG_LEVEL still asks for libtorch's logs.
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) FLAGS_caffe2_log_level = 3;
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = serve != 0;
    if (serve != 0) opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto pg = backend(store, std::string(host), rank, world, cuda_device, timeout);
    *out = new Group{store, pg, cuda_device < 0};
  });
}

void vggctl_dist_free(void *p) {
  auto *g = static_cast<Group *>(p);
  g->close();
  delete g;
}

// In place, on every rank: op 0 sum, 1 max, 2 min.
int vggctl_dist_all_reduce(void *g, at::Tensor *t, int op, char *err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    static_cast<Group *>(g)->backend()->allreduce(v, o)->wait();
  });
}

// In place: every rank gets rank `root`'s values.
int vggctl_dist_broadcast(void *g, at::Tensor *t, int root, char *err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group *>(g)->backend()->broadcast(v, o)->wait();
  });
}

// A new tensor: `x` summed over the ranks, differentiably (see SumAcross).
int vggctl_dist_sum_autograd(void *g, at::Tensor *x, at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
    *out = new at::Tensor(SumAcross::apply(*x, reinterpret_cast<int64_t>(g)));
  });
}

// The roll call after a failed collective, through the store (as c10d's
// own desync report finds the ranks that never joined a collective): this
// rank closes its backend (the other survivors' collectives with it then
// fail at once, and they come to the roll call too), checks in, then looks
// for every rank's check-in for at most `wait_ms`; present[r] says whether
// rank r checked in. Fails if the store is out of reach (it may have been
// served by a rank that is gone); should it go while this rank looks (rank
// 0, which served it, ending its own roll call), what was seen stands if
// another rank had checked in, else it fails.
int vggctl_dist_roll_call(void *p, int rank, int world, int64_t wait_ms, uint8_t *present,
                          char *err, size_t len) {
  return guarded(err, len, [&] {
    auto *g = static_cast<Group *>(p);
    g->close();
    auto &store = g->store;
    std::chrono::milliseconds wait(wait_ms);
    store->setTimeout(wait);
    auto key = [](int r) { return "roll-call/" + std::to_string(r); };
    store->set(key(rank), std::vector<uint8_t>{1});
    present[rank] = 1;
    bool others = false;
    auto deadline = std::chrono::steady_clock::now() + wait;
    for (;;) {
      bool all = true;
      for (int r = 0; r < world; ++r) {
        try {
          present[r] = present[r] != 0 || store->check({key(r)}) ? 1 : 0;
        } catch (const std::exception &) {
          if (others) return;
          throw;
        }
        others = others || (r != rank && present[r] != 0);
        all = all && present[r] != 0;
      }
      if (all || std::chrono::steady_clock::now() >= deadline) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
}

int vggctl_dist_barrier(void *g, char *err, size_t len) {
  return guarded(err, len, [&] { static_cast<Group *>(g)->backend()->barrier()->wait(); });
}

// Waits at most `timeout_ms` for the work queued so far on GPU `device`'s
// current stream: *done is 1 once it has finished, 0 if the time ran out
// (the work goes on). It polls an event, sleeping 100 us between looks,
// where a copy to the host would block in the driver for good: a step
// whose captured all-reduce waits for a rank that is gone never ends, and
// c10d's watchdog does not watch collectives replayed by a graph.
int vggctl_dist_await_device(int device, int64_t timeout_ms, int *done, char *err, size_t len) {
  *done = 1;
  return guarded(err, len, [&] {
#ifdef VGGCTL_CUDA
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
    c10::Event ev(c10::DeviceType::CUDA);
    ev.record(stream);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!ev.query()) {
      if (std::chrono::steady_clock::now() >= deadline) {
        *done = 0;
        return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
#else
    (void)device;
    (void)timeout_ms;
#endif
  });
}

}  // extern "C"
