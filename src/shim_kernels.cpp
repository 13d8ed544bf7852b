// The fused step's kernels of its own (issue #18; their source is
// src/kernels.cu) and what they make: BnReluKernels, training-mode
// BatchNorm, ReLU and the 2x2 max-pool after them (or no pool) as one
// autograd function on channels-last fp16 batches (its Rust caller is
// src/shim/step.rs); and
// relu_bias_grad, the backward of conv+bias+ReLU's ReLU and bias in one
// pass (for Conv3x3 in src/shim_step.cpp, through shim_kernels.h).
//
// Forward: the batch statistics and the running statistics' update
// (libtorch's `batch_norm_update_stats`), then one kernel that reads the
// batch once and writes only the pooled output and a 1-byte window
// position per output (max_pool2d keeps 8-byte indices, and the plain ops
// also write and read back the full-size BatchNorm and ReLU outputs).
// Backward: BatchNorm's two per-channel sums, taken over the pooled
// gradient (each window sends its gradient to one position, where its
// maximum was positive: the pool's and the ReLU's backward), then one pass
// over the batch for the input gradient; where the plain ops write the
// pool's full-size gradient, mask it, and read it and the batch twice
// more in BatchNorm's backward. Without a pool the same kernels write
// relu(batch_norm(x)) and keep no window positions: one pass forward, one
// reduction and one pass back (the ReLU's mask is the saved output's sign).
//
// On CUDA the kernels are compiled at run time by NVRTC (from the torch
// wheel's nvidia packages) for the GPU in use and launched through the
// driver API on libtorch's current stream, so a CUDA graph captures them.
// Neither library is linked: libtorch already loads libcuda, and NVRTC is
// opened only when a kernel is first wanted. On the CPU the same source,
// compiled into the shim with a host prelude, runs each thread in turn:
// what the CPU tests check is the GPU's code.
#include "shim.h"
#include "shim_kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/batch_norm_update_stats.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>

#ifdef VGGCTL_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <map>
#include <mutex>
#include <vector>
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using vggctl_shim::guarded;

// The kernels as the CPU runs them: every "thread" of a launch in turn.
namespace host {
using half_t = uint16_t;
thread_local long long thread_index = 0;
thread_local long long thread_count = 1;
inline float to_float(half_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline half_t to_half(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
#define KERNEL inline
#define DEVICE_FN inline
#define FIRST_INDEX (::host::thread_index)
#define INDEX_STRIDE (::host::thread_count)
#include "kernels.cu"
#undef KERNEL
#undef DEVICE_FN
#undef FIRST_INDEX
#undef INDEX_STRIDE
#undef NHWC_SPLIT

// A prime number of threads, so that the grid-stride loops wrap unevenly.
constexpr long long kThreads = 7;

template <typename F, typename... A>
void launch(F kernel, A... args) {
  thread_count = kThreads;
  for (thread_index = 0; thread_index < kThreads; ++thread_index) kernel(args...);
}
}  // namespace host

using host::half_t;

#ifdef VGGCTL_CUDA
// What NVRTC compiles: the device prelude, then src/kernels.cu.
const char *const kPrelude = R"prelude(
typedef unsigned short half_t;
#define KERNEL extern "C" __global__
#define DEVICE_FN __device__ __forceinline__
#define FIRST_INDEX ((long long)blockIdx.x * blockDim.x + threadIdx.x)
#define INDEX_STRIDE ((long long)blockDim.x * gridDim.x)
__device__ __forceinline__ float to_float(half_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ half_t to_half(float f) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
)prelude";

const char *const kSource =
#include "kernels_source.inc"
    ;

template <typename F>
void resolve(void *lib, F &f, const char *name) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  TORCH_CHECK(f != nullptr, "no ", name, " in the loaded library");
}

// NVRTC, from the torch wheel's nvidia package beside torch/lib (found
// from libc10_cuda's own path), else wherever the loader finds it.
// libnvrtc opens its builtins library by name and has no run path of its
// own: opening that one first, by its full path, is what lets it be found.
struct Nvrtc {
  decltype(&nvrtcCreateProgram) create;
  decltype(&nvrtcCompileProgram) compile;
  decltype(&nvrtcGetProgramLogSize) log_size;
  decltype(&nvrtcGetProgramLog) log;
  decltype(&nvrtcGetCUBINSize) cubin_size;
  decltype(&nvrtcGetCUBIN) cubin;
  decltype(&nvrtcDestroyProgram) destroy;
  decltype(&nvrtcGetErrorString) error_string;
};

// Opens, with its full path, each of `dir`'s libnvrtc-builtins for CUDA
// `major` (the one its libnvrtc opens by name: whichever minor version
// the wheel shipped).
void open_builtins(const std::string &dir, const std::string &major) {
  DIR *listing = opendir(dir.c_str());
  if (listing == nullptr) return;
  const std::string prefix = "libnvrtc-builtins.so." + major + ".";
  while (const dirent *entry = readdir(listing)) {
    if (std::string(entry->d_name).rfind(prefix, 0) == 0) {
      dlopen((dir + entry->d_name).c_str(), RTLD_LAZY | RTLD_GLOBAL);
    }
  }
  closedir(listing);
}

void *open_nvrtc() {
  const std::string major = std::to_string(CUDA_VERSION / 1000);
  const std::string name = "libnvrtc.so." + major;
  if (void *lib = dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD)) return lib;
  Dl_info info{};
  auto anchor = reinterpret_cast<void *>(&c10::cuda::getCurrentCUDAStream);
  if (dladdr(anchor, &info) != 0 && info.dli_fname != nullptr) {
    std::string dir = info.dli_fname;
    dir = dir.substr(0, dir.rfind('/') + 1) + "../../nvidia/";
    for (const std::string pkg : {"cu" + major + "/lib/", std::string("cuda_nvrtc/lib/")}) {
      open_builtins(dir + pkg, major);
      if (void *lib = dlopen((dir + pkg + name).c_str(), RTLD_LAZY)) return lib;
    }
  }
  return dlopen(name.c_str(), RTLD_LAZY);
}

const Nvrtc &nvrtc() {
  static const Nvrtc api = [] {
    void *lib = open_nvrtc();
    const char *why = lib == nullptr ? dlerror() : nullptr;
    TORCH_CHECK(lib != nullptr, "NVRTC (libnvrtc) not found: ", why != nullptr ? why : "");
    Nvrtc a{};
    resolve(lib, a.create, "nvrtcCreateProgram");
    resolve(lib, a.compile, "nvrtcCompileProgram");
    resolve(lib, a.log_size, "nvrtcGetProgramLogSize");
    resolve(lib, a.log, "nvrtcGetProgramLog");
    resolve(lib, a.cubin_size, "nvrtcGetCUBINSize");
    resolve(lib, a.cubin, "nvrtcGetCUBIN");
    resolve(lib, a.destroy, "nvrtcDestroyProgram");
    resolve(lib, a.error_string, "nvrtcGetErrorString");
    return a;
  }();
  return api;
}

// The kernels compiled for compute capability major.minor (a cubin).
std::string compile(int major, int minor) {
  const auto &api = nvrtc();
  auto check = [&](nvrtcResult r, const char *what) {
    TORCH_CHECK(r == NVRTC_SUCCESS, "NVRTC ", what, ": ", api.error_string(r));
  };
  std::string source = std::string(kPrelude) + kSource;
  nvrtcProgram prog = nullptr;
  check(api.create(&prog, source.c_str(), "vggctl_kernels.cu", 0, nullptr, nullptr), "create");
  std::string arch = "--gpu-architecture=sm_" + std::to_string(major * 10 + minor);
  const char *options[] = {arch.c_str(), "--std=c++17"};
  nvrtcResult compiled = api.compile(prog, 2, options);
  std::string out;
  if (compiled == NVRTC_SUCCESS) {
    size_t size = 0;
    api.cubin_size(prog, &size);
    out.resize(size);
    api.cubin(prog, out.data());
  } else {
    size_t size = 0;
    api.log_size(prog, &size);
    out.resize(size);
    api.log(prog, out.data());
  }
  api.destroy(&prog);
  TORCH_CHECK(compiled == NVRTC_SUCCESS, "NVRTC could not compile the kernels for ", arch, ": ",
              api.error_string(compiled), "\n", out);
  return out;
}

// The driver API, from the libcuda libtorch loaded.
struct Driver {
  decltype(&cuCtxGetCurrent) ctx_get_current;
  decltype(&cuCtxSetCurrent) ctx_set_current;
  decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain;
  decltype(&cuDeviceGet) device_get;
  decltype(&cuDeviceGetAttribute) device_attribute;
  decltype(&cuModuleLoadData) module_load;
  decltype(&cuModuleGetFunction) module_function;
  decltype(&cuLaunchKernel) launch;
  decltype(&cuGetErrorString) error_string;
};

const Driver &driver() {
  static const Driver api = [] {
    void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    TORCH_CHECK(lib != nullptr, "libcuda.so.1 not found");
    Driver a{};
    resolve(lib, a.ctx_get_current, "cuCtxGetCurrent");
    resolve(lib, a.ctx_set_current, "cuCtxSetCurrent");
    resolve(lib, a.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    resolve(lib, a.device_get, "cuDeviceGet");
    resolve(lib, a.device_attribute, "cuDeviceGetAttribute");
    resolve(lib, a.module_load, "cuModuleLoadData");
    resolve(lib, a.module_function, "cuModuleGetFunction");
    resolve(lib, a.launch, "cuLaunchKernel");
    resolve(lib, a.error_string, "cuGetErrorString");
    return a;
  }();
  return api;
}

void check(CUresult r, const char *what) {
  if (r == CUDA_SUCCESS) return;
  const char *msg = nullptr;
  driver().error_string(r, &msg);
  TORCH_CHECK(false, what, ": ", msg != nullptr ? msg : "unknown CUDA driver error");
}

// Makes the device's primary context (libtorch's) current to this thread
// for the driver API, if the runtime has not yet.
void use_primary_context(int device) {
  const auto &api = driver();
  CUcontext ctx = nullptr;
  check(api.ctx_get_current(&ctx), "cuCtxGetCurrent");
  if (ctx != nullptr) return;
  CUdevice dev = 0;
  check(api.device_get(&dev, device), "cuDeviceGet");
  check(api.primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check(api.ctx_set_current(ctx), "cuCtxSetCurrent");
}

// The kernel `name` on `device`: the source compiled for the device's
// compute capability and loaded into its context once (the first call
// must come before any graph capture: the start-up check makes it).
CUfunction kernel_on(int device, const char *name) {
  static std::mutex mutex;
  static std::map<std::pair<int, std::string>, CUfunction> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(device, std::string(name));
  if (auto it = loaded.find(key); it != loaded.end()) return it->second;
  const auto &api = driver();
  use_primary_context(device);
  CUdevice dev = 0;
  check(api.device_get(&dev, device), "cuDeviceGet");
  int major = 0;
  int minor = 0;
  check(api.device_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute");
  check(api.device_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute");
  static std::map<int, CUmodule> modules;
  if (modules.count(device) == 0) {
    // Kept for the process's life, like libtorch's own jitted kernels.
    std::string cubin = compile(major, minor);
    CUmodule module = nullptr;
    check(api.module_load(&module, cubin.data()), "loading the compiled kernels");
    modules[device] = module;
  }
  CUfunction f = nullptr;
  check(api.module_function(&f, modules[device], name), "finding a compiled kernel");
  loaded[key] = f;
  return f;
}

// Launches kernel `name` over `n` elements (grid-stride: any grid covers
// them) on the current stream of `on`'s device.
template <typename... A>
void launch_on_gpu(const char *name, const at::Tensor &on, long long n, A... args) {
  int device = on.device().index();
  CUfunction f = kernel_on(device, name);
  use_primary_context(device);
  void *params[] = {static_cast<void *>(&args)...};
  const unsigned block = 256;
  long long blocks = std::min<long long>((n + block - 1) / block, 1 << 20);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  check(driver().launch(f, static_cast<unsigned>(std::max<long long>(blocks, 1)), 1, 1, block,
                        1, 1, 0, stream, params, nullptr),
        name);
}
#endif  // VGGCTL_CUDA

// Runs a kernel over `n` elements on `on`'s device: `name` on a GPU,
// `on_cpu` (the same kernel, compiled for the host) on the CPU.
template <typename F, typename... A>
void run(const char *name, F on_cpu, const at::Tensor &on, long long n, A... args) {
  if (n == 0) return;
  if (on.is_cuda()) {
#ifdef VGGCTL_CUDA
    launch_on_gpu(name, on, n, args...);
#else
    TORCH_CHECK(false, "this build has no CUDA headers: the fused step's kernels need them");
#endif
  } else {
    host::launch(on_cpu, args...);
  }
}

template <typename T>
T *ptr(const at::Tensor &t) {
  return static_cast<T *>(t.data_ptr());
}

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// How a per-channel reduction over `rows` rows of C channels is split: a
// thread per (chunk of rows, channel), about 256k threads (enough to fill
// an H100/H200; fewer for few rows), each summing its chunk.
struct Chunks {
  long long count;
  long long rows;
};

Chunks chunked(long long rows, int C) {
  long long count = std::max<long long>(1, std::min<long long>(rows, (1 << 18) / C));
  long long per_chunk = (rows + count - 1) / count;
  return {(rows + per_chunk - 1) / per_chunk, per_chunk};
}

// What BnReluKernels is called in its errors.
const char *bn_relu_name(int64_t pool) {
  return pool == 2 ? "BatchNorm+ReLU+max-pool" : "BatchNorm+ReLU (vggctl's kernels)";
}

void check_inputs(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias,
                  const at::Tensor &mean, const at::Tensor &var, int64_t pool) {
  const char *name = bn_relu_name(pool);
  TORCH_CHECK(pool == 1 || pool == 2, name, ": pool must be 1 or 2");
  TORCH_CHECK(x.scalar_type() == at::kHalf && x.dim() == 4 && x.is_contiguous(kChannelsLast),
              name, " runs on fp16 channels-last batches");
  TORCH_CHECK(x.size(2) >= pool && x.size(3) >= pool, name, " needs 2x2 or more");
  for (const auto *t : {&weight, &bias, &mean, &var}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->numel() == x.size(1),
                name, " needs contiguous fp32 parameters, one per channel");
  }
}

// Training-mode BatchNorm and the ReLU after it, and with pool = 2 the 2x2
// max-pool after that, as one autograd function (pool = 1: no pool).
struct BnReluKernels : public torch::autograd::Function<BnReluKernels> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                            const at::Tensor &bias, const at::Tensor &running_mean,
                            const at::Tensor &running_var, double momentum, double eps,
                            int64_t pool) {
    check_inputs(x, weight, bias, running_mean, running_var, pool);
    c10::DeviceGuard on_device(x.device());
    // Biased variance for the batch; the running variance gets the
    // unbiased one, as BatchNorm's update does.
    auto stats = at::batch_norm_update_stats(x, running_mean, running_var, momentum);
    auto mean = std::get<0>(stats);
    at::Tensor invstd = std::get<1>(stats).add(eps).rsqrt();
    int C = static_cast<int>(x.size(1));
    int H = static_cast<int>(x.size(2));
    int W = static_cast<int>(x.size(3));
    int P = static_cast<int>(pool);
    auto layout = x.options().memory_format(kChannelsLast);
    auto out = at::empty({x.size(0), C, H / P, W / P}, layout);
    // Without a pool every gradient goes to position 0: no positions kept.
    at::Tensor argmax = pool == 2 ? at::empty(out.sizes(), layout.dtype(at::kByte)) : at::Tensor();
    auto *positions = argmax.defined() ? ptr<unsigned char>(argmax) : nullptr;
    run("bn_relu_forward", host::bn_relu_forward, x, out.numel(), ptr<const half_t>(x),
        ptr<const float>(mean), ptr<const float>(invstd), ptr<const float>(weight),
        ptr<const float>(bias), ptr<half_t>(out), positions, static_cast<long long>(out.numel()),
        C, H, W, P);
    ctx->save_for_backward({x, weight, mean, invstd, out, argmax});
    ctx->saved_data["pool"] = pool;
    return out;
  }

  // BatchNorm's two per-channel sums from the (pooled) gradient (with a
  // pool, a reduction over a quarter of the batch), then the input
  // gradient in one pass; the weight's and bias's gradients are those sums.
  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0];
    const auto &mean = saved[2];
    const auto &invstd = saved[3];
    const auto &out = saved[4];
    const auto &argmax = saved[5];
    const auto *positions = argmax.defined() ? ptr<const unsigned char>(argmax) : nullptr;
    int P = static_cast<int>(ctx->saved_data["pool"].toInt());
    c10::DeviceGuard on_device(x.device());
    auto dy = grads[0].to(at::kHalf).contiguous(kChannelsLast);
    int C = static_cast<int>(x.size(1));
    int H = static_cast<int>(x.size(2));
    int W = static_cast<int>(x.size(3));
    long long rows = out.numel() / C;
    auto chunks = chunked(rows, C);
    auto partial = at::empty({2, chunks.count, C}, x.options().dtype(at::kFloat));
    run("bn_relu_backward_reduce", host::bn_relu_backward_reduce, x, chunks.count * C,
        ptr<const half_t>(dy), ptr<const half_t>(out), positions, ptr<const half_t>(x),
        ptr<const float>(mean), ptr<const float>(invstd), ptr<float>(partial[0]),
        ptr<float>(partial[1]), rows, C, H, W, P, chunks.rows, chunks.count * C);
    auto sums = partial.sum(1);  // [2, C]: sum(g), sum(g * xhat)
    auto dx = at::empty_like(x, x.options(), kChannelsLast);
    float inv_count = 1.0f / static_cast<float>(x.numel() / C);
    run("bn_relu_backward", host::bn_relu_backward, x, dx.numel(), ptr<const half_t>(dy),
        ptr<const half_t>(out), positions, ptr<const half_t>(x), ptr<const float>(mean),
        ptr<const float>(invstd), ptr<const float>(saved[1]), ptr<const float>(sums[0]),
        ptr<const float>(sums[1]), ptr<half_t>(dx), static_cast<long long>(dx.numel()), C, H, W,
        P, inv_count);
    return {dx,           sums[1],      sums[0],      at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace vggctl_shim {

bool relu_bias_grad_fits(const at::Tensor &grad, const at::Tensor &out) {
  auto fits = [](const at::Tensor &t) {
    return t.scalar_type() == at::kHalf && t.dim() == 4 && t.is_contiguous(kChannelsLast);
  };
  return fits(grad) && fits(out) && grad.sizes() == out.sizes() && grad.device() == out.device();
}

std::tuple<at::Tensor, at::Tensor> relu_bias_grad(const at::Tensor &grad, const at::Tensor &out) {
  TORCH_CHECK(relu_bias_grad_fits(grad, out),
              "ReLU+bias gradient runs on fp16 channels-last batches of one shape");
  c10::DeviceGuard on_device(grad.device());
  int C = static_cast<int>(grad.size(1));
  long long rows = grad.numel() / C;
  auto chunks = chunked(rows, C);
  auto grad_in = at::empty_like(grad, grad.options(), kChannelsLast);
  auto partial = at::empty({chunks.count, C}, grad.options().dtype(at::kFloat));
  run("relu_bias_grad", host::relu_bias_grad, grad, chunks.count * C, ptr<const half_t>(grad),
      ptr<const half_t>(out), ptr<half_t>(grad_in), ptr<float>(partial), rows, C, chunks.rows,
      chunks.count * C);
  return {grad_in, partial.sum(0)};
}

}  // namespace vggctl_shim

extern "C" {

// max_pool2d(relu(batch_norm(x)), 2) in training mode as one operation (see
// BnReluKernels), updating the running statistics; *out is a new tensor on
// success.
int vggctl_bn_relu_pool(const at::Tensor *x, const at::Tensor *weight, const at::Tensor *bias,
                        const at::Tensor *running_mean, const at::Tensor *running_var,
                        double momentum, double eps, at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
    *out = new at::Tensor(BnReluKernels::apply(*x, *weight, *bias, *running_mean, *running_var,
                                               momentum, eps, 2));
  });
}

// relu(batch_norm(x)) in training mode as one operation of vggctl's own
// kernels (see BnReluKernels), updating the running statistics; *out is a
// new tensor on success.
int vggctl_bn_relu_own(const at::Tensor *x, const at::Tensor *weight, const at::Tensor *bias,
                       const at::Tensor *running_mean, const at::Tensor *running_var,
                       double momentum, double eps, at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
    *out = new at::Tensor(BnReluKernels::apply(*x, *weight, *bias, *running_mean, *running_var,
                                               momentum, eps, 1));
  });
}

// The ReLU's and the bias's gradients in one kernel (see relu_bias_grad):
// *grad_in and *bias_grad are new tensors on success.
int vggctl_relu_bias_grad(const at::Tensor *grad, const at::Tensor *out, at::Tensor **grad_in,
                          at::Tensor **bias_grad, char *err, size_t len) {
  *grad_in = nullptr;
  *bias_grad = nullptr;
  return guarded(err, len, [&] {
    auto both = vggctl_shim::relu_bias_grad(*grad, *out);
    *grad_in = new at::Tensor(std::get<0>(both));
    *bias_grad = new at::Tensor(std::get<1>(both));
  });
}

// Compiles the kernels with NVRTC for compute capability major.minor, as a
// GPU run would, and puts the cubin's size in *bytes (no GPU needed).
int vggctl_compile_kernels(int major, int minor, size_t *bytes, char *err, size_t len) {
  *bytes = 0;
  return guarded(err, len, [&] {
#ifdef VGGCTL_CUDA
    *bytes = compile(major, minor).size();
#else
    (void)major;
    (void)minor;
    TORCH_CHECK(false, "this build has no CUDA headers: the kernels are not compiled for GPUs");
#endif
  });
}

}  // extern "C"
