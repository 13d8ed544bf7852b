// The fused step's kernels of its own (issue #18), on channels-last (NHWC)
// fp16 batches: BatchNorm's affine transform, ReLU and the 2x2 max-pool
// after them (if one follows) in one pass forward, and back the pool's,
// the ReLU's and BatchNorm's backward in a reduction over the (pooled)
// gradient and one pass over the batch (levers 3 and 4); without
// BatchNorm, the ReLU's backward and the convolution bias's gradient in
// one pass (lever 6).
//
// This one source is compiled twice: at run time by NVRTC for the GPU in
// use (src/shim_kernels.cpp prepends the device prelude), and by the C++
// compiler into the shim with the host prelude of src/shim_kernels.cpp,
// which runs each kernel's every thread in turn on the CPU. The CPU tests
// run the very code the GPU runs, indexing and rounding included. So: no
// shared memory, no __syncthreads, no atomics, no warp functions; a thread
// owns its outputs; every loop is grid-stride, so any launch size covers
// the whole tensor. The prelude supplies `half_t` (fp16 bits), `to_float`,
// `to_half` (round to nearest even), `KERNEL` and the thread indices.

// The i-th element's coordinates in an NHWC tensor of C channels and
// width W; `row` gets the rest (n * H + h).
#define NHWC_SPLIT(i, C, W, c, w, row)  \
  int c = (int)((i) % (C));              \
  long long row = (i) / (C);             \
  int w = (int)(row % (W));              \
  row /= (W);

// relu(x * scale + shift) rounded to fp16 and back: the value the plain
// ops' fp16 BatchNorm output would hold after the ReLU (rounding keeps
// order and sign, so rounding before or after the ReLU is the same). A NaN
// stays NaN, as in ReLU.
DEVICE_FN float bn_relu_value(half_t x, float scale, float shift) {
  float y = to_float(x) * scale + shift;
  return to_float(to_half(y < 0.f ? 0.f : y));
}

// The BatchNorm+ReLU kernels take `pool`: 2 where a 2x2 max-pool follows
// the ReLU (lever 4), 1 where none does (lever 3: the output is
// relu(batch_norm(x)) itself, and no window positions are kept: `argmax`
// is null). Output (n, oh, ow, c) covers the pool x pool window at
// (pool * oh, pool * ow); `k` (0 .. pool * pool - 1, row-major) is a
// position in it.

// The index in x of position k of output (n, oh, ow, c)'s window.
DEVICE_FN long long window_at(long long n, int oh, int ow, int k, int c, int C, int H, int W,
                              int pool) {
  return ((n * H + pool * oh + k / pool) * W + pool * ow + k % pool) * C + c;
}

// The window position output o's gradient goes to.
DEVICE_FN int position_of(const unsigned char *argmax, long long o) {
  return argmax == 0 ? 0 : (int)argmax[o];
}

// The rows [*first, *last) of chunk `chunk` of `rows` rows.
DEVICE_FN void chunk_rows(long long chunk, long long rows, long long rows_per_chunk,
                          long long *first, long long *last) {
  *first = chunk * rows_per_chunk;
  *last = *first + rows_per_chunk < rows ? *first + rows_per_chunk : rows;
}

// out[n, oh, ow, c] = max over the window of relu(batch_norm(x)), with the
// window position of the maximum in `argmax` (with a pool): the first
// maximum, or the last NaN, as max_pool2d picks it. BatchNorm's transform
// is x * scale + shift with scale = weight * invstd and shift = bias -
// mean * scale. Odd heights and widths lose their last row and column to
// the pool, as max_pool2d's floor mode does.
KERNEL void bn_relu_forward(const half_t *x, const float *mean, const float *invstd,
                            const float *weight, const float *bias, half_t *out,
                            unsigned char *argmax, long long n_out, int C, int H, int W,
                            int pool) {
  int OH = H / pool;
  int OW = W / pool;
  for (long long i = FIRST_INDEX; i < n_out; i += INDEX_STRIDE) {
    NHWC_SPLIT(i, C, OW, c, ow, row)
    int oh = (int)(row % OH);
    long long n = row / OH;
    float scale = weight[c] * invstd[c];
    float shift = bias[c] - mean[c] * scale;
    float best = 0.f;
    int arg = 0;
    for (int k = 0; k < pool * pool; ++k) {
      float v = bn_relu_value(x[window_at(n, oh, ow, k, c, C, H, W, pool)], scale, shift);
      if (k == 0 || v > best || v != v) {
        best = v;
        arg = k;
      }
    }
    out[i] = to_half(best);
    if (argmax != 0) argmax[i] = (unsigned char)arg;
  }
}

// The gradient reaching relu(batch_norm(x))'s output at output o (with a
// pool, at the window's maximum): the incoming gradient where that output
// was positive, else zero (ReLU's gradient is zero at and below 0).
DEVICE_FN float routed_grad(const half_t *grad_out, const half_t *out, long long o) {
  return to_float(out[o]) > 0.f ? to_float(grad_out[o]) : 0.f;
}

// BatchNorm's backward needs two sums per channel of the gradient g that
// reaches its output: sum(g) and sum(g * xhat), xhat = (x - mean) * invstd.
// A pool sends each window's gradient to one position, so both are sums
// over the outputs: thread j owns channel j % C of the output rows
// (n, oh, ow) of chunk j / C, and writes its chunk's two sums to
// sum_g[j] and sum_gx[j] (the caller adds up the chunks; no atomics).
KERNEL void bn_relu_backward_reduce(const half_t *grad_out, const half_t *out,
                                    const unsigned char *argmax, const half_t *x,
                                    const float *mean, const float *invstd, float *sum_g,
                                    float *sum_gx, long long rows, int C, int H, int W, int pool,
                                    long long rows_per_chunk, long long n_threads) {
  int OH = H / pool;
  int OW = W / pool;
  for (long long j = FIRST_INDEX; j < n_threads; j += INDEX_STRIDE) {
    int c = (int)(j % C);
    long long first = 0;
    long long last = 0;
    chunk_rows(j / C, rows, rows_per_chunk, &first, &last);
    float sg = 0.f;
    float sgx = 0.f;
    for (long long r = first; r < last; ++r) {
      long long o = r * C + c;
      float g = routed_grad(grad_out, out, o);
      if (g == 0.f) continue;
      int ow = (int)(r % OW);
      int oh = (int)((r / OW) % OH);
      long long n = r / OW / OH;
      long long at = window_at(n, oh, ow, position_of(argmax, o), c, C, H, W, pool);
      sg += g;
      sgx += g * (to_float(x[at]) - mean[c]) * invstd[c];
    }
    sum_g[j] = sg;
    sum_gx[j] = sgx;
  }
}

// BatchNorm's input gradient, with the pool's and the ReLU's backward in
// the same pass: g (the routed gradient: with a pool, the window's where
// this position was its maximum, zero elsewhere and in the rows and
// columns the pool dropped), then dx = weight * invstd * (g - sum_g /
// count - xhat * sum_gx / count), count = N * H * W, as BatchNorm's
// training backward.
KERNEL void bn_relu_backward(const half_t *grad_out, const half_t *out,
                             const unsigned char *argmax, const half_t *x, const float *mean,
                             const float *invstd, const float *weight, const float *sum_g,
                             const float *sum_gx, half_t *grad_in, long long n_in, int C, int H,
                             int W, int pool, float inv_count) {
  int OH = H / pool;
  int OW = W / pool;
  for (long long i = FIRST_INDEX; i < n_in; i += INDEX_STRIDE) {
    NHWC_SPLIT(i, C, W, c, w, row)
    int h = (int)(row % H);
    long long n = row / H;
    int oh = h / pool;
    int ow = w / pool;
    float g = 0.f;
    if (oh < OH && ow < OW) {
      long long o = ((n * OH + oh) * OW + ow) * C + c;
      if (position_of(argmax, o) == (h % pool) * pool + w % pool) {
        g = routed_grad(grad_out, out, o);
      }
    }
    float xhat = (to_float(x[i]) - mean[c]) * invstd[c];
    float dx = weight[c] * invstd[c] * (g - sum_g[c] * inv_count - xhat * sum_gx[c] * inv_count);
    grad_in[i] = to_half(dx);
  }
}

// Without BatchNorm (issue #18, lever 6): the gradient through the ReLU
// after a convolution and its bias, and the bias's gradient, in one pass
// over rows (n, h, w) of C channels. Thread j owns channel j % C of the
// rows of chunk j / C: it writes the masked gradient (the incoming one
// where the saved output is positive, else zero, as ReLU's backward) and
// the chunk's sum of it to partial[j], in fp32; the caller sums the
// chunks. No atomics: the sum is the same on every run.
KERNEL void relu_bias_grad(const half_t *grad, const half_t *out, half_t *grad_in,
                           float *partial, long long rows, int C, long long rows_per_chunk,
                           long long n_threads) {
  for (long long j = FIRST_INDEX; j < n_threads; j += INDEX_STRIDE) {
    int c = (int)(j % C);
    long long first = 0;
    long long last = 0;
    chunk_rows(j / C, rows, rows_per_chunk, &first, &last);
    float sum = 0.f;
    for (long long r = first; r < last; ++r) {
      long long i = r * C + c;
      half_t g = to_float(out[i]) > 0.f ? grad[i] : (half_t)0;
      grad_in[i] = g;
      sum += to_float(g);
    }
    partial[j] = sum;
  }
}
