// The fused training step's own operations (issue #18), as autograd
// functions libtorch does not have. The one Rust caller is src/shim/step.rs.
//
// Conv3x3: a 3x3 convolution (stride 1, padding 1), with or without its
// bias, and optionally the ReLU after it. Forward on CUDA with the ReLU is
// cuDNN's conv+bias+ReLU in one kernel (`cudnn_convolution_relu`, which
// has no autograd of its own), where the eager model writes the
// convolution's output, then reads and writes it again for the bias and
// once more for the ReLU; elsewhere it is the same arithmetic in plain ops
// (what the CPU tests check the backward against). Backward: the ReLU's
// mask from the saved output, the bias gradient as its sum over batch and
// pixels (with `fused_grad`, both in one pass of vggctl's own kernel,
// src/kernels.cu, where the batch is fp16 channels-last), and
// `convolution_backward` for the input and weight gradients;
// with `two_streams` on CUDA the weight gradient (and the bias's) is
// computed on a side stream while the input gradient is computed on the
// current one, forked and joined with events, so that a CUDA graph
// captures two branches the GPU runs side by side. Under autocast it
// computes in autocast's dtype, as the eager convolution would (inputs
// cast, gradients returned in each input's own dtype).
//
// BnRelu: training-mode BatchNorm and the ReLU after it in one pass each
// way, cuDNN's `cudnnBatchNormalizationForwardTrainingEx` /
// `BackwardEx` with `CUDNN_BATCHNORM_OPS_BN_ACTIVATION` (fp16 NHWC batches,
// fp32 parameters; libtorch calls the same functions without the
// activation), on libtorch's cuDNN handle and current stream, so a CUDA
// graph captures it. The running statistics are updated as libtorch's
// cuDNN BatchNorm updates them. CUDA only: elsewhere it refuses, and the
// model runs the plain ops.
#include "shim.h"
#include "shim_kernels.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/threshold_backward.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <optional>
#include <tuple>

#ifdef VGGCTL_CUDA
// The device-generic event and stream guard (through c10's registered CUDA
// implementation): ATen's CUDA ones call the CUDA runtime inline, which
// this binary does not link.
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#ifdef VGGCTL_CUDNN
#include <ATen/cudnn/Handle.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <dlfcn.h>
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using vggctl_shim::guarded;

// The dtype the convolution computes in: autocast's where it is on for the
// input's device, else the input's.
at::ScalarType compute_dtype(const at::Tensor &x) {
  auto device = x.device().type();
  if (at::autocast::is_autocast_enabled(device) && at::isFloatingType(x.scalar_type())) {
    return at::autocast::get_autocast_dtype(device);
  }
  return x.scalar_type();
}

// The input and weight gradients of a 3x3 convolution of `x` by `w` whose
// output's gradient is `g`, for those `mask` asks for.
std::tuple<at::Tensor, at::Tensor> conv_grads(const at::Tensor &g, const at::Tensor &x,
                                              const at::Tensor &w, std::array<bool, 2> mask) {
  auto parts = at::convolution_backward(g, x, w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false,
                                        {0, 0}, 1, {mask[0], mask[1], false});
  return {std::get<0>(parts), std::get<1>(parts)};
}

at::Tensor bias_grad(const at::Tensor &g) { return g.sum({0, 2, 3}, false, at::kFloat); }

#ifdef VGGCTL_CUDA
// Input, weight and bias (if `bias`) gradients with the input's on the
// current stream and the other two on a side stream forked from it and
// joined back, so that they overlap (and a CUDA graph captures both).
std::array<at::Tensor, 3> two_stream_grads(const at::Tensor &g, const at::Tensor &x,
                                           const at::Tensor &w, bool bias) {
  auto index = g.device().index();
  c10::Stream current = c10::cuda::getCurrentCUDAStream(index);
  c10::Stream side = c10::cuda::getStreamFromPool(false, index);
  c10::Event forked(c10::DeviceType::CUDA);
  forked.record(current);
  forked.block(side);
  at::Tensor gw;
  at::Tensor gb;
  {
    c10::StreamGuard on_side(side);
    gw = std::get<1>(conv_grads(g, x, w, {false, true}));
    if (bias) gb = bias_grad(g);
  }
  auto gx = std::get<0>(conv_grads(g, x, w, {true, false}));
  c10::Event joined(c10::DeviceType::CUDA);
  joined.record(side);
  joined.block(current);
  // Made on the side stream, read on the current one from now on: the
  // caching allocator must not give their memory to the side stream again
  // before the current stream is done with them. (g, x and w were made on
  // the current stream, which now waits for the side stream's work.)
  gw.record_stream(current);
  if (gb.defined()) gb.record_stream(current);
  return {gx, gw, gb};
}
#endif

struct Conv3x3 : public torch::autograd::Function<Conv3x3> {
  // `b` absent: no bias (autograd then has two inputs with gradients).
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const std::optional<at::Tensor> &b, bool relu, bool two_streams,
                            bool fused_grad) {
    auto dtype = compute_dtype(x);
    // The casts below are the ones autocast would make; no second round.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto format = x.suggest_memory_format();
    auto xc = x.to(dtype).contiguous(format);
    auto wc = w.to(dtype).contiguous(format);
    std::optional<at::Tensor> bc;
    if (b) bc = b->to(dtype);
    at::Tensor y;
    if (relu && x.is_cuda()) {
      y = at::cudnn_convolution_relu(xc, wc, bc, {1, 1}, {1, 1}, {1, 1}, 1);
    } else {
      y = at::conv2d(xc, wc, bc, {1, 1}, {1, 1}, {1, 1}, 1);
      if (relu) y = at::relu(y);
    }
    // The output is saved only for the ReLU's mask.
    ctx->save_for_backward({xc, wc, relu ? y : at::Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["two_streams"] = two_streams;
    ctx->saved_data["fused_grad"] = fused_grad;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(b ? b->scalar_type() : at::kFloat);
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &xc = saved[0];
    const auto &wc = saved[1];
    auto dtype_of = [&](const char *key) {
      return static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
    };
    auto format = xc.suggest_memory_format();
    auto g = grads[0].to(xc.scalar_type()).contiguous(format);
    bool bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    at::Tensor gx, gw, gb;
    if (ctx->saved_data["relu"].toBool()) {
      // The ReLU's gradient and the bias's in one pass where asked and it
      // fits (fp16 channels-last), else ReLU's backward (and the bias's
      // sum below).
      if (bias && ctx->saved_data["fused_grad"].toBool() &&
          vggctl_shim::relu_bias_grad_fits(g, saved[2])) {
        std::tie(g, gb) = vggctl_shim::relu_bias_grad(g, saved[2]);
        bias = false;
      } else {
        g = at::threshold_backward(g, saved[2], 0).contiguous(format);
      }
    }
#ifdef VGGCTL_CUDA
    if (ctx->saved_data["two_streams"].toBool() && g.is_cuda() && mask[0] && mask[1]) {
      auto three = two_stream_grads(g, xc, wc, bias);
      gx = three[0];
      gw = three[1];
      if (three[2].defined()) gb = three[2];
    }
#endif
    if (!gw.defined() && !gx.defined()) {
      std::tie(gx, gw) = conv_grads(g, xc, wc, mask);
      if (bias) gb = bias_grad(g);
    }
    return {gx.defined() ? gx.to(dtype_of("x_dtype")) : gx,
            gw.defined() ? gw.to(dtype_of("w_dtype")) : gw,
            gb.defined() ? gb.to(dtype_of("b_dtype")) : gb, at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

#ifdef VGGCTL_CUDNN
// cuDNN's legacy BatchNorm functions, found at run time in the libcudnn that
// libtorch loaded: linking libcudnn ourselves would make the binary's start
// depend on finding it through our own library path.
struct Cudnn {
  decltype(&cudnnCreateTensorDescriptor) create_tensor;
  decltype(&cudnnSetTensor4dDescriptor) set_tensor;
  decltype(&cudnnDestroyTensorDescriptor) destroy_tensor;
  decltype(&cudnnCreateActivationDescriptor) create_activation;
  decltype(&cudnnSetActivationDescriptor) set_activation;
  decltype(&cudnnDestroyActivationDescriptor) destroy_activation;
  decltype(&cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize) forward_workspace;
  decltype(&cudnnGetBatchNormalizationTrainingExReserveSpaceSize) reserve_size;
  decltype(&cudnnBatchNormalizationForwardTrainingEx) forward;
  decltype(&cudnnGetBatchNormalizationBackwardExWorkspaceSize) backward_workspace;
  decltype(&cudnnBatchNormalizationBackwardEx) backward;
  decltype(&cudnnGetErrorString) error_string;
};

template <typename F>
void resolve(F &f, const char *name) {
  f = reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
  TORCH_CHECK(f != nullptr, "the loaded cuDNN has no ", name);
}

const Cudnn &cudnn() {
  static const Cudnn api = [] {
    Cudnn a{};
    resolve(a.create_tensor, "cudnnCreateTensorDescriptor");
    resolve(a.set_tensor, "cudnnSetTensor4dDescriptor");
    resolve(a.destroy_tensor, "cudnnDestroyTensorDescriptor");
    resolve(a.create_activation, "cudnnCreateActivationDescriptor");
    resolve(a.set_activation, "cudnnSetActivationDescriptor");
    resolve(a.destroy_activation, "cudnnDestroyActivationDescriptor");
    resolve(a.forward_workspace, "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize");
    resolve(a.reserve_size, "cudnnGetBatchNormalizationTrainingExReserveSpaceSize");
    resolve(a.forward, "cudnnBatchNormalizationForwardTrainingEx");
    resolve(a.backward_workspace, "cudnnGetBatchNormalizationBackwardExWorkspaceSize");
    resolve(a.backward, "cudnnBatchNormalizationBackwardEx");
    resolve(a.error_string, "cudnnGetErrorString");
    return a;
  }();
  return api;
}

void check(cudnnStatus_t status, const char *what) {
  TORCH_CHECK(status == CUDNN_STATUS_SUCCESS, what, ": ", cudnn().error_string(status));
}

// A 4-d tensor descriptor: the batch (NHWC fp16) or the per-channel
// parameters (1 x C x 1 x 1 fp32).
struct TensorDesc {
  cudnnTensorDescriptor_t desc = nullptr;
  TensorDesc(cudnnTensorFormat_t format, cudnnDataType_t type, int64_t n, int64_t c, int64_t h,
             int64_t w) {
    check(cudnn().create_tensor(&desc), "creating a tensor descriptor");
    try {
      check(cudnn().set_tensor(desc, format, type, static_cast<int>(n), static_cast<int>(c),
                               static_cast<int>(h), static_cast<int>(w)),
            "describing a tensor");
    } catch (...) {
      cudnn().destroy_tensor(desc);
      throw;
    }
  }
  ~TensorDesc() { cudnn().destroy_tensor(desc); }
  TensorDesc(const TensorDesc &) = delete;
  TensorDesc &operator=(const TensorDesc &) = delete;
};

struct ReluDesc {
  cudnnActivationDescriptor_t desc = nullptr;
  ReluDesc() {
    check(cudnn().create_activation(&desc), "creating an activation descriptor");
    try {
      check(cudnn().set_activation(desc, CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN, 0.0),
            "describing ReLU");
    } catch (...) {
      cudnn().destroy_activation(desc);
      throw;
    }
  }
  ~ReluDesc() { cudnn().destroy_activation(desc); }
  ReluDesc(const ReluDesc &) = delete;
  ReluDesc &operator=(const ReluDesc &) = delete;
};

// The descriptors one BnRelu call needs, for the batch `x`.
struct BnReluDescs {
  TensorDesc batch;
  TensorDesc params;
  ReluDesc relu;
  explicit BnReluDescs(const at::Tensor &x)
      : batch(CUDNN_TENSOR_NHWC, CUDNN_DATA_HALF, x.size(0), x.size(1), x.size(2), x.size(3)),
        params(CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, 1, x.size(1), 1, 1) {}
};

constexpr cudnnBatchNormMode_t kMode = CUDNN_BATCHNORM_SPATIAL_PERSISTENT;
constexpr cudnnBatchNormOps_t kOps = CUDNN_BATCHNORM_OPS_BN_ACTIVATION;

at::Tensor bytes(size_t n, const at::Tensor &like) {
  return at::empty({static_cast<int64_t>(n)}, like.options().dtype(at::kByte));
}

void check_inputs(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias,
                  const at::Tensor &mean, const at::Tensor &var) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "BatchNorm+ReLU runs on CUDA fp16 channels-last batches");
  TORCH_CHECK(x.size(1) % 4 == 0, "BatchNorm+ReLU needs a multiple of 4 channels");
  for (const auto *t : {&weight, &bias, &mean, &var}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->numel() == x.size(1),
                "BatchNorm+ReLU needs contiguous fp32 parameters, one per channel");
  }
}

struct BnRelu : public torch::autograd::Function<BnRelu> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                            const at::Tensor &bias, const at::Tensor &running_mean,
                            const at::Tensor &running_var, double momentum, double eps) {
    check_inputs(x, weight, bias, running_mean, running_var);
    const auto &api = cudnn();
    auto handle = at::native::getCudnnHandle();
    BnReluDescs d(x);
    size_t workspace_size = 0;
    size_t reserve_size = 0;
    check(api.forward_workspace(handle, kMode, kOps, d.batch.desc, nullptr, d.batch.desc,
                                d.params.desc, d.relu.desc, &workspace_size),
          "sizing BatchNorm+ReLU's workspace");
    check(api.reserve_size(handle, kMode, kOps, d.relu.desc, d.batch.desc, &reserve_size),
          "sizing BatchNorm+ReLU's reserve");
    auto y = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
    auto workspace = bytes(workspace_size, x);
    auto reserve = bytes(reserve_size, x);
    auto save_mean = at::empty({x.size(1)}, weight.options());
    auto save_invstd = at::empty({x.size(1)}, weight.options());
    float one = 1.0f;
    float zero = 0.0f;
    check(api.forward(handle, kMode, kOps, &one, &zero, d.batch.desc, x.const_data_ptr(), nullptr,
                      nullptr, d.batch.desc, y.data_ptr(), d.params.desc, weight.const_data_ptr(),
                      bias.const_data_ptr(), momentum, running_mean.data_ptr(),
                      running_var.data_ptr(), eps, save_mean.data_ptr(), save_invstd.data_ptr(),
                      d.relu.desc, workspace.data_ptr(), workspace_size, reserve.data_ptr(),
                      reserve_size),
          "BatchNorm+ReLU forward");
    ctx->save_for_backward({x, weight, bias, save_mean, save_invstd, reserve, y});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  // cuDNN's backward; should it fail (a shape the start-up check did not
  // meet), the same gradients from the ReLU's mask and libtorch's
  // BatchNorm backward with the saved statistics.
  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto dy = grads[0].to(at::kHalf).contiguous(at::MemoryFormat::ChannelsLast);
    double eps = ctx->saved_data["eps"].toDouble();
    try {
      return cudnn_backward(saved, dy, eps);
    } catch (const c10::Error &) {
      auto g = at::threshold_backward(dy, saved[6], 0);
      auto parts = at::native_batch_norm_backward(g, saved[0], saved[1], std::nullopt,
                                                  std::nullopt, saved[3], saved[4], true, eps,
                                                  {true, true, true});
      return {std::get<0>(parts), std::get<1>(parts), std::get<2>(parts), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor()};
    }
  }

  static variable_list cudnn_backward(const variable_list &saved, const at::Tensor &dy,
                                      double eps) {
    const auto &x = saved[0];
    const auto &weight = saved[1];
    const auto &bias = saved[2];
    const auto &reserve = saved[5];
    const auto &y = saved[6];
    const auto &api = cudnn();
    auto handle = at::native::getCudnnHandle();
    BnReluDescs d(x);
    size_t workspace_size = 0;
    check(api.backward_workspace(handle, kMode, kOps, d.batch.desc, d.batch.desc, d.batch.desc,
                                 nullptr, d.batch.desc, d.params.desc, d.relu.desc,
                                 &workspace_size),
          "sizing BatchNorm+ReLU's backward workspace");
    auto workspace = bytes(workspace_size, x);
    auto dx = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
    auto dweight = at::empty_like(weight);
    auto dbias = at::empty_like(weight);
    float one = 1.0f;
    float zero = 0.0f;
    check(api.backward(handle, kMode, kOps, &one, &zero, &one, &zero, d.batch.desc,
                       x.const_data_ptr(), d.batch.desc, y.const_data_ptr(), d.batch.desc,
                       dy.const_data_ptr(), nullptr, nullptr, d.batch.desc, dx.data_ptr(),
                       d.params.desc, weight.const_data_ptr(), bias.const_data_ptr(),
                       dweight.data_ptr(), dbias.data_ptr(), eps,
                       saved[3].const_data_ptr(), saved[4].const_data_ptr(), d.relu.desc,
                       workspace.data_ptr(), workspace_size, reserve.data_ptr(),
                       static_cast<size_t>(reserve.numel())),
          "BatchNorm+ReLU backward");
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
#endif  // VGGCTL_CUDNN

}  // namespace

extern "C" {

// conv3x3(x, w) + b (b null: no bias), relu'd if `relu`, as one operation
// with its own backward, on two streams if `two_streams`, the ReLU's and
// the bias's gradients in one kernel of vggctl's own if `fused_grad` (see
// Conv3x3);
// *out is a new tensor on success.
int vggctl_conv3x3(const at::Tensor *x, const at::Tensor *w, const at::Tensor *b, int relu,
                   int two_streams, int fused_grad, at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
    std::optional<at::Tensor> bias;
    if (b != nullptr) bias = *b;
    *out = new at::Tensor(
        Conv3x3::apply(*x, *w, bias, relu != 0, two_streams != 0, fused_grad != 0));
  });
}

// relu(batch_norm(x)) in training mode as one operation (see BnRelu),
// updating the running statistics; *out is a new tensor on success.
int vggctl_bn_relu(const at::Tensor *x, const at::Tensor *weight, const at::Tensor *bias,
                   const at::Tensor *running_mean, const at::Tensor *running_var, double momentum,
                   double eps, at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] {
#ifdef VGGCTL_CUDNN
    *out = new at::Tensor(
        BnRelu::apply(*x, *weight, *bias, *running_mean, *running_var, momentum, eps));
#else
    TORCH_CHECK(false, "this build has no cuDNN headers: BatchNorm+ReLU is not fused");
#endif
  });
}

}  // extern "C"
