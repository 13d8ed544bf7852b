// The libtorch calls tch does not bind: the autocast dtype, CPU autocast, the TF32
// switches, CUDA memory statistics, bf16 support, CUDA graphs and the fused
// (multi-tensor) SGD, Adam and AdamW updates. Compiled
// by build.rs against the libtorch that tch links; the CUDA parts only when
// that libtorch has CUDA and the CUDA runtime headers are found
// (VGGCTL_CUDA). The one Rust caller is src/shim.rs.
//
// Every function catches C++ exceptions: an error comes back as a non-zero
// status with its message copied into `err` (never an exception crossing
// into Rust).
#include "shim.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/from_blob.h>

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/csrc/jit/api/module.h>

#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef VGGCTL_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/Event.h>
#endif

namespace {

using vggctl_shim::copy_err;
using vggctl_shim::guarded;

#ifdef VGGCTL_CUDA
// A graph captures, and warms up before that, on a side stream of its own
// (capture cannot use the default stream, and the first steps on a stream
// create its cuBLAS workspace and cuDNN plans, which a capture must not).
// `enter`/`leave` are separate calls from Rust with the step's tensor
// operations in between, so the guard lives here.
struct Graph {
  explicit Graph(c10::DeviceIndex device)
      : side(c10::cuda::getStreamFromPool(false, device)) {}
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::StreamGuard> guard;
  bool captured = false;
};

// `waiter` waits for the work queued on `on` so far, without blocking the host.
void stream_wait(const c10::Stream &waiter, const c10::Stream &on) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(on);
  ev.block(waiter);
}
#endif

}  // namespace

extern "C" {

// libtorch's CPU operators on the calling thread run on that thread alone
// (a data-loading worker): OpenMP's thread count is a per-thread setting,
// read by at::parallel_for through omp_get_max_threads. ATen first sets
// this thread's count from the process's (its lazy per-thread set-up), then
// it is lowered to 1 here. Returns 0 where libtorch has no OpenMP.
int vggctl_one_cpu_thread_here() {
  at::get_num_threads();
  using SetThreads = void (*)(int);
  auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set == nullptr) return 0;
  set(1);
  return at::get_num_threads() == 1;
}

// Blocks of `bytes` or more are mapped from the kernel and unmapped when
// freed, whatever was freed before: glibc otherwise raises this threshold
// to the largest block freed, after which batches of images (megabytes,
// made by one thread and freed by another) come from the heaps, whose
// peak then grows with the run. Returns 0 where malloc has no such setting.
int vggctl_map_big_blocks(size_t bytes) {
#if defined(__GLIBC__)
  // Fixing the threshold also fixes the heaps' trim threshold (glibc's
  // dynamic one is twice the mmap threshold, up to 64 MiB): kept at 16
  // times the blocks, freed memory stays for the next image's buffers
  // instead of being given back and faulted in again.
  return mallopt(M_MMAP_THRESHOLD, static_cast<int>(bytes)) &&
         mallopt(M_TRIM_THRESHOLD, static_cast<int>(16 * bytes));
#else
  (void)bytes;
  return 0;
#endif
}

// The memory of image batches, reused: a batch's bytes go back to a short
// list when its tensor is freed (on whatever thread), and the next batch of
// that size takes them, so that a run faults its batches' pages in once,
// not every step (a fresh 38 MB batch every step cost the streamed loader
// a third of a prepared file's time in page faults and zeroing).
namespace {

struct BatchPool {
  std::mutex lock;
  std::vector<std::pair<void *, size_t>> idle;
};

// Never destroyed: a batch may be freed while the process exits.
BatchPool &batch_pool() {
  static BatchPool *pool = new BatchPool;
  return *pool;
}

// More than a loader's batches in flight: the queue, the one being made,
// the one in use, and the one the step is done with.
constexpr size_t kIdleBatches = 6;

void give_back_batch(void *p, size_t n) {
  BatchPool &pool = batch_pool();
  std::lock_guard<std::mutex> guard(pool.lock);
  if (pool.idle.size() >= kIdleBatches) {
    std::free(pool.idle.front().first);
    pool.idle.erase(pool.idle.begin());
  }
  pool.idle.emplace_back(p, n);
}

// `n` bytes, idle ones of that size or new zeroed ones; the 2 MiB-aligned
// part of new ones asked to be backed by huge pages (one fault per 2 MiB).
void *take_batch(size_t n) {
  {
    BatchPool &pool = batch_pool();
    std::lock_guard<std::mutex> guard(pool.lock);
    for (auto it = pool.idle.begin(); it != pool.idle.end(); ++it) {
      if (it->second == n) {
        void *p = it->first;
        pool.idle.erase(it);
        return p;
      }
    }
  }
  void *p = std::calloc(n, 1);
  if (p == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  const uintptr_t huge = 2u << 20;
  uintptr_t start = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) & ~(huge - 1);
  if (end > start) madvise(reinterpret_cast<void *>(start), end - start, MADV_HUGEPAGE);
#endif
  return p;
}

}  // namespace

// A new uint8 CPU tensor of `dims` over pooled memory (see above), and its
// bytes; `*out` is a new tensor handle (tch's).
int vggctl_pooled_bytes(const int64_t *dims, size_t ndims, at::Tensor **out, uint8_t **data,
                        char *err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<int64_t> sizes(dims, dims + ndims);
    size_t n = 1;
    for (int64_t d : sizes) n *= static_cast<size_t>(d);
    void *p = take_batch(n == 0 ? 1 : n);
    at::Tensor t = at::from_blob(
        p, sizes, [n](void *q) { give_back_batch(q, n == 0 ? 1 : n); },
        at::TensorOptions().dtype(at::kByte));
    *data = static_cast<uint8_t *>(p);
    *out = new at::Tensor(std::move(t));
  });
}

// libtorch's profiler (Kineto), as torch.profiler runs it: the operators
// called on the host and, with `cuda`, every kernel run on the GPU
// (those replayed by a CUDA graph too, through CUPTI). Without a GPU,
// stderr is closed while Kineto starts and stops: a CUDA build's Kineto
// logs a GPU count it failed to read ("gpuGetDeviceCount failed") as an
// error line that means nothing for a CPU run; a real failure still comes
// back as an exception.
static bool g_profiling_cuda = false;

static void without_stderr_unless(bool keep, const std::function<void()> &f) {
  const int saved = keep ? -1 : dup(2);
  const int null = saved < 0 ? -1 : open("/dev/null", O_WRONLY);
  if (null >= 0) dup2(null, 2);
  auto restore = [&] {
    if (null >= 0) dup2(saved, 2), close(null);
    if (saved >= 0) close(saved);
  };
  try {
    f();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

int vggctl_profiler_start(int cuda, char *err, size_t len) {
  return guarded(err, len, [&] {
    namespace p = torch::profiler::impl;
    std::set<p::ActivityType> what{p::ActivityType::CPU};
    if (cuda) what.insert(p::ActivityType::CUDA);
    const p::ProfilerConfig config(p::ProfilerState::KINETO);
    g_profiling_cuda = cuda != 0;
    without_stderr_unless(g_profiling_cuda, [&] {
      torch::autograd::profiler::prepareProfiler(config, what);
      torch::autograd::profiler::enableProfiler(config, what);
    });
  });
}

// Stops the profiler; `sink` gets each event recorded: its name, whether it
// ran on a GPU, the thread (or stream) it ran on, its start and duration in
// nanoseconds.
int vggctl_profiler_stop(void *ctx,
                         void (*sink)(void *, const char *, int, uint64_t, uint64_t, uint64_t),
                         char *err, size_t len) {
  return guarded(err, len, [&] {
    std::unique_ptr<torch::autograd::profiler::ProfilerResult> result;
    without_stderr_unless(g_profiling_cuda,
                          [&] { result = torch::autograd::profiler::disableProfiler(); });
    if (!result) throw std::runtime_error("the profiler was not running");
    for (const auto &e : result->events()) {
      const int gpu = e.deviceType() == c10::DeviceType::CUDA;
      const uint64_t lane = gpu ? static_cast<uint64_t>(e.deviceResourceId()) : e.startThreadId();
      sink(ctx, e.name().c_str(), gpu, lane, e.startNs(), e.durationNs());
    }
  });
}

// A TorchScript module (tch's handle: a torch::jit::Module*) serialized into
// memory; `sink` receives the bytes once.
int vggctl_jit_save_bytes(void *module, void *ctx, void (*sink)(void *, const char *, size_t),
                          char *err, size_t len) {
  return guarded(err, len, [&] {
    std::ostringstream os;
    static_cast<torch::jit::Module *>(module)->save(os);
    const std::string bytes = os.str();
    sink(ctx, bytes.data(), bytes.size());
  });
}

int vggctl_shim_has_cuda() {
#ifdef VGGCTL_CUDA
  return 1;
#else
  return 0;
#endif
}

// dtype: 0 = float16, 1 = bfloat16. Autocast's dtype is per thread.
int vggctl_set_autocast_dtype_cuda(int dtype, char *err, size_t len) {
  return guarded(err, len, [&] {
    at::autocast::set_autocast_dtype(at::kCUDA, dtype == 1 ? at::kBFloat16 : at::kHalf);
  });
}

// CPU autocast to bfloat16 around a forward pass (tch binds only CUDA's),
// as `torch.autocast("cpu")` does: `enter` reports whether it was on before,
// `leave` restores that and clears the cast cache when the outermost
// autocast region ends.
int vggctl_cpu_autocast_enter(int *prev, char *err, size_t len) {
  *prev = 0;
  return guarded(err, len, [&] {
    *prev = at::autocast::is_autocast_enabled(at::kCPU) ? 1 : 0;
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::increment_nesting();
  });
}

int vggctl_cpu_autocast_leave(int prev, char *err, size_t len) {
  return guarded(err, len, [&] {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCPU, prev != 0);
  });
}

// Cached casts of the weights would outlive a captured graph's pool.
int vggctl_set_autocast_cache(int on, char *err, size_t len) {
  return guarded(err, len, [&] { at::autocast::set_autocast_cache_enabled(on != 0); });
}

// cuDNN: deterministic algorithms only, chosen by heuristics (no timing
// runs), as `torch.backends.cudnn.deterministic = True; benchmark = False`.
int vggctl_set_cudnn_deterministic(int on, char *err, size_t len) {
  return guarded(err, len, [&] {
    at::globalContext().setDeterministicCuDNN(on != 0);
    if (on != 0) at::globalContext().setBenchmarkCuDNN(false);
  });
}

int vggctl_cudnn_deterministic() { return at::globalContext().deterministicCuDNN() ? 1 : 0; }

int vggctl_set_tf32(int on, char *err, size_t len) {
  return guarded(err, len, [&] {
    at::globalContext().setAllowTF32CuBLAS(on != 0);
    at::globalContext().setAllowTF32CuDNN(on != 0);
  });
}

// The device's compute capability, major version (0 without the CUDA half).
int vggctl_cuda_capability(int device, int *out, char *err, size_t len) {
  *out = 0;
  return guarded(err, len, [&] {
#ifdef VGGCTL_CUDA
    // From the driver (libcuda, loaded by libtorch already): the runtime's
    // cudaGetDeviceProperties would tie this binary to libcudart's path.
    using GetAttr = int (*)(int *, int, int);
    using GetDev = int (*)(int *, int);
    void *cuda = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (cuda == nullptr) cuda = dlopen("libcuda.so.1", RTLD_LAZY);
    if (cuda == nullptr) throw std::runtime_error("libcuda.so.1 not found");
    // cuInit first: a process may ask before anything else touched CUDA
    // (the driver answers CUDA_ERROR_NOT_INITIALIZED then); a second
    // cuInit is a no-op.
    using Init = int (*)(unsigned);
    auto init = reinterpret_cast<Init>(dlsym(cuda, "cuInit"));
    if (init == nullptr || init(0) != 0) throw std::runtime_error("cuInit failed");
    auto get_dev = reinterpret_cast<GetDev>(dlsym(cuda, "cuDeviceGet"));
    auto get_attr = reinterpret_cast<GetAttr>(dlsym(cuda, "cuDeviceGetAttribute"));
    if (get_dev == nullptr || get_attr == nullptr) throw std::runtime_error("libcuda lacks cuDeviceGetAttribute");
    int dev = 0, major = 0;
    const int kComputeCapabilityMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    if (get_dev(&dev, device) != 0 || get_attr(&major, kComputeCapabilityMajor, dev) != 0)
      throw std::runtime_error("cuDeviceGetAttribute failed");
    *out = major;
#else
    (void)device;
#endif
  });
}

// The tensors `ts[0..n]` as the list a multi-tensor kernel takes.
static std::vector<at::Tensor> tensor_list(at::Tensor *const *ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

// libtorch's fused SGD (`_fused_sgd_`, the learning rate a tensor on the
// parameters' device so a captured graph reads its current value): one pass
// over the `n` parameters, gradients and momentum buffers (one parameter
// group: one weight decay). `bufs` is null without momentum; with
// `found_inf` (a float that is 1 on an overflowed fp16 step) the kernel
// leaves everything untouched.
int vggctl_fused_sgd(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *bufs,
                     size_t n, double weight_decay, double momentum, at::Tensor *lr, int nesterov,
                     at::Tensor *found_inf, char *err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> momentum_bufs;
    if (bufs != nullptr) momentum_bufs = tensor_list(bufs, n);
    std::optional<at::Tensor> found;
    if (found_inf != nullptr) found = *found_inf;
    at::_fused_sgd_(tensor_list(params, n), tensor_list(grads, n), momentum_bufs, weight_decay,
                    momentum, *lr, /*dampening=*/0.0, nesterov != 0, /*maximize=*/false,
                    /*is_first_step=*/false, /*grad_scale=*/std::nullopt, found);
  });
}

// libtorch's fused Adam over `n` tensors of one parameter group: AdamW's
// decoupled weight decay (`_fused_adamw_`) when `decoupled`, else Adam's L2
// term added to the gradient (`_fused_adam_`); AMSGrad where
// `max_exp_avg_sqs` is not null (the largest second moments so far). `step`
// is the float count of updates taken, this one included, on the
// parameters' device, shared by all of them.
int vggctl_fused_adam(at::Tensor *const *params, at::Tensor *const *grads,
                      at::Tensor *const *exp_avgs, at::Tensor *const *exp_avg_sqs,
                      at::Tensor *const *max_exp_avg_sqs, size_t n, at::Tensor *step,
                      at::Tensor *lr, double beta1, double beta2, double weight_decay,
                      double eps, int decoupled, at::Tensor *found_inf, char *err, size_t len) {
  return guarded(err, len, [&] {
    std::optional<at::Tensor> found;
    if (found_inf != nullptr) found = *found_inf;
    std::vector<at::Tensor> steps(n, *step);
    auto ps = tensor_list(params, n), gs = tensor_list(grads, n);
    auto m1 = tensor_list(exp_avgs, n), m2 = tensor_list(exp_avg_sqs, n);
    bool amsgrad = max_exp_avg_sqs != nullptr;
    std::vector<at::Tensor> maxes;
    if (amsgrad) maxes = tensor_list(max_exp_avg_sqs, n);
    if (decoupled != 0) {
      at::_fused_adamw_(ps, gs, m1, m2, maxes, steps, *lr, beta1, beta2, weight_decay, eps,
                        amsgrad, /*maximize=*/false, /*grad_scale=*/std::nullopt, found);
    } else {
      at::_fused_adam_(ps, gs, m1, m2, maxes, steps, *lr, beta1, beta2, weight_decay, eps,
                       amsgrad, /*maximize=*/false, /*grad_scale=*/std::nullopt, found);
    }
  });
}

// Peak bytes held by tensors since the last reset, as
// torch.cuda.max_memory_allocated reports it.
int vggctl_cuda_peak_bytes(int device, int64_t *out, int reset, char *err, size_t len) {
  *out = 0;
  return guarded(err, len, [&] {
#ifdef VGGCTL_CUDA
    auto *alloc = c10::cuda::CUDACachingAllocator::get();
    if (alloc == nullptr) return;
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(device);
#else
    (void)device;
    (void)reset;
#endif
  });
}

#ifdef VGGCTL_CUDA
#define NO_CUDA_GRAPHS(...)
#else
#define NO_CUDA_GRAPHS(...)                                                  \
  do {                                                                       \
    (void)g;                                                                 \
    copy_err("this vggctl was built without CUDA graph support", err, len); \
    return 1;                                                                \
  } while (0)
#endif

int vggctl_graph_new(int device, void **g, char *err, size_t len) {
  *g = nullptr;
  (void)device;
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] { *g = new Graph(static_cast<c10::DeviceIndex>(device)); });
#endif
}

void vggctl_graph_free(void *g) {
#ifdef VGGCTL_CUDA
  try {
    auto *graph = static_cast<Graph *>(g);
    graph->guard.reset();
    delete graph;
  } catch (...) {
  }
#else
  (void)g;
#endif
}

// Makes the graph's side stream current, after the work already queued.
int vggctl_graph_enter(void *g, char *err, size_t len) {
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] {
    auto *graph = static_cast<Graph *>(g);
    if (graph->guard) throw std::runtime_error("graph stream entered twice");
    stream_wait(graph->side.unwrap(),
                c10::cuda::getCurrentCUDAStream(graph->side.device_index()).unwrap());
    graph->guard.emplace(graph->side.unwrap());
  });
#endif
}

// Back to the stream that was current, which waits for the side stream's work.
int vggctl_graph_leave(void *g, char *err, size_t len) {
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] {
    auto *graph = static_cast<Graph *>(g);
    if (!graph->guard) throw std::runtime_error("graph stream left but not entered");
    graph->guard.reset();
    stream_wait(c10::cuda::getCurrentCUDAStream(graph->side.device_index()).unwrap(),
                graph->side.unwrap());
  });
#endif
}

int vggctl_graph_capture_begin(void *g, char *err, size_t len) {
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] {
    auto *graph = static_cast<Graph *>(g);
    if (!graph->guard) throw std::runtime_error("capture must run on the graph's stream");
    graph->graph.capture_begin();
  });
#endif
}

int vggctl_graph_capture_end(void *g, char *err, size_t len) {
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] {
    auto *graph = static_cast<Graph *>(g);
    graph->graph.capture_end();
    graph->captured = true;
  });
#endif
}

// Launches the captured work on the current stream.
int vggctl_graph_replay(void *g, char *err, size_t len) {
  NO_CUDA_GRAPHS();
#ifdef VGGCTL_CUDA
  return guarded(err, len, [&] {
    auto *graph = static_cast<Graph *>(g);
    if (!graph->captured) throw std::runtime_error("replay of a graph that was never captured");
    graph->graph.replay();
  });
#endif
}

}  // extern "C"
