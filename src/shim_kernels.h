// What src/shim_kernels.cpp offers the shim's other C++ files.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vggctl_shim {

// Whether relu_bias_grad runs on these: fp16 channels-last batches of one
// shape on one device (CUDA, or the CPU for tests).
bool relu_bias_grad_fits(const at::Tensor &grad, const at::Tensor &out);

// The backward of relu(conv(x) + bias) up to the convolution: the gradient
// `grad` masked where the saved output `out` is not positive (ReLU's
// backward), and the bias's gradient (its sum over batch and pixels, fp32),
// in one pass of vggctl's own kernel.
std::tuple<at::Tensor, at::Tensor> relu_bias_grad(const at::Tensor &grad, const at::Tensor &out);

}  // namespace vggctl_shim
