// The fused training step's own operations (issue #18), as autograd
// functions libtorch does not have. The one Rust caller is src/shim/step.rs.
//
// ConvBiasRelu: a 3x3 convolution (stride 1, padding 1), its bias and the
// ReLU after it. Forward on CUDA is cuDNN's conv+bias+ReLU in one kernel
// (`cudnn_convolution_relu`, which has no autograd of its own), where the
// eager model writes the convolution's output, then reads and writes it
// again for the bias and once more for the ReLU; elsewhere it is the same
// arithmetic in plain ops (what the CPU tests check the backward against).
// Backward: the ReLU's mask from the saved output, the bias gradient as its
// sum over batch and pixels, and `convolution_backward` for the input and
// weight gradients only. Under autocast it computes in autocast's dtype, as
// the eager convolution would (inputs cast, gradients returned in each
// input's own dtype).
#include "shim.h"

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

struct ConvBiasRelu : public torch::autograd::Function<ConvBiasRelu> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b) {
    auto dtype = compute_dtype(x);
    // The casts below are the ones autocast would make; no second round.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto format = x.suggest_memory_format();
    auto xc = x.to(dtype).contiguous(format);
    auto wc = w.to(dtype).contiguous(format);
    auto bc = b.to(dtype);
    at::Tensor y;
    if (x.is_cuda()) {
      y = at::cudnn_convolution_relu(xc, wc, bc, {1, 1}, {1, 1}, {1, 1}, 1);
    } else {
      y = at::relu(at::conv2d(xc, wc, bc, {1, 1}, {1, 1}, {1, 1}, 1));
    }
    ctx->save_for_backward({xc, wc, y});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(b.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &xc = saved[0];
    const auto &wc = saved[1];
    const auto &y = saved[2];
    auto dtype_of = [&](const char *key) {
      return static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
    };
    auto g = at::threshold_backward(grads[0].to(y.scalar_type()), y, 0);
    auto gb = g.sum({0, 2, 3}, false, at::kFloat).to(dtype_of("b_dtype"));
    std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), false};
    auto parts = at::convolution_backward(g.contiguous(xc.suggest_memory_format()), xc, wc,
                                          std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0},
                                          1, mask);
    auto gx = std::get<0>(parts);
    auto gw = std::get<1>(parts);
    return {gx.defined() ? gx.to(dtype_of("x_dtype")) : gx,
            gw.defined() ? gw.to(dtype_of("w_dtype")) : gw, gb};
  }
};

}  // namespace

extern "C" {

// relu(conv3x3(x, w) + b) as one operation with its own backward (see
// ConvBiasRelu); *out is a new tensor on success.
int vggctl_conv_bias_relu(const at::Tensor *x, const at::Tensor *w, const at::Tensor *b,
                          at::Tensor **out, char *err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] { *out = new at::Tensor(ConvBiasRelu::apply(*x, *w, *b)); });
}

}  // extern "C"
