// Naive PN (pointwise-neighborhood) kernel: one thread per logit out[b, x, h, j], a dot product
// over the head dim with the key of window entry j, plus the relative positional bias.
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace {

template <typename T>
__global__ void __launch_bounds__(kNaiveThreads) naive_pn_kernel(const __grid_constant__ UnfusedParams p) {
  const int T_ = p.extent[0] * p.extent[1] * p.extent[2];
  const int W = p.window, H = p.heads, C = p.dim;
  const int G = p.heads / p.heads_kv;
  const int64_t total = int64_t(p.batch) * T_ * H * W;
  const T* a = static_cast<const T*>(p.a);
  const T* bm = static_cast<const T*>(p.bm);
  T* out = static_cast<T*>(p.out);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = idx;
    const int j = static_cast<int>(rest % W);
    rest /= W;
    const int h = static_cast<int>(rest % H);
    rest /= H;
    const int x = static_cast<int>(rest % T_);
    const int b = static_cast<int>(rest / T_);
    const TokenWindow w = token_window(p, x);
    int ja[3];
    ja[2] = j % p.kernel[2];
    ja[1] = (j / p.kernel[2]) % p.kernel[1];
    ja[0] = j / (p.kernel[2] * p.kernel[1]);
    bool valid = true;
    int ki[3];
#pragma unroll
    for (int t = 0; t < 3; ++t) {
      valid = valid && ja[t] < w.len[t];
      ki[t] = w.start[t] + ja[t];
    }
    float v = p.fill;
    if (valid) {
      const int y = token_index(p, w.g, ki);
      const T* qrow = a + ((int64_t(b) * T_ + x) * H + h) * C;
      const T* krow = bm + ((int64_t(b) * T_ + y) * p.heads_kv + h / G) * C;
      float acc = 0.f;
      for (int c = 0; c < C; ++c) acc += to_float(qrow[c]) * to_float(krow[c]);
      v = acc * p.scale;
      if (p.rpb != nullptr) v += p.rpb[int64_t(h) * rpb_size(p) + rpb_index(p, w.i, ki)];
    }
    out[idx] = from_float<T>(v);
  }
}

}  // namespace

cudaError_t naive_pn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  const int64_t total = int64_t(p.batch) * p.extent[0] * p.extent[1] * p.extent[2] * p.heads *
                        p.window;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    naive_pn_kernel<T><<<naive_blocks(total), kNaiveThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace unfused
}  // namespace natten_jax
