// Naive IN (inverse-neighborhood) kernel: one thread per output element out[b, y, hk, c], the
// sum over the queries whose window holds key y (and over the G query heads of key/value head
// hk) of w[b, x, h, j(x, y)] * bm[b, x, h, c].
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace {

template <typename T>
__global__ void __launch_bounds__(kNaiveThreads) naive_in_kernel(const __grid_constant__ UnfusedParams p) {
  const int T_ = p.extent[0] * p.extent[1] * p.extent[2];
  const int W = p.window, H = p.heads, Hkv = p.heads_kv, C = p.dim;
  const int G = H / Hkv;
  const int64_t total = int64_t(p.batch) * T_ * Hkv * C;
  const T* w = static_cast<const T*>(p.a);
  const T* xm = static_cast<const T*>(p.bm);
  T* out = static_cast<T*>(p.out);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = idx;
    const int c = static_cast<int>(rest % C);
    rest /= C;
    const int hk = static_cast<int>(rest % Hkv);
    rest /= Hkv;
    const int y = static_cast<int>(rest % T_);
    const int b = static_cast<int>(rest / T_);
    const TokenWindow kw = token_window(p, y);  // the key's group and in-group coordinates
    int lo[3], hi[3];
#pragma unroll
    for (int a = 0; a < 3; ++a)
      inverse_range(kw.i[a], kw.i[a], p.kernel[a], kw.glen[a], p.causal[a] != 0, &lo[a], &hi[a]);
    const int64_t base = int64_t(b) * T_;
    float acc = 0.f;
    int qi[3];
    for (qi[0] = lo[0]; qi[0] < hi[0]; ++qi[0]) {
      const int j0 = kw.i[0] - window_start(qi[0], p.kernel[0], 1, kw.glen[0], p.causal[0] != 0);
      for (qi[1] = lo[1]; qi[1] < hi[1]; ++qi[1]) {
        const int j1 =
            kw.i[1] - window_start(qi[1], p.kernel[1], 1, kw.glen[1], p.causal[1] != 0);
        for (qi[2] = lo[2]; qi[2] < hi[2]; ++qi[2]) {
          const int j2 =
              kw.i[2] - window_start(qi[2], p.kernel[2], 1, kw.glen[2], p.causal[2] != 0);
          const int j = (j0 * p.kernel[1] + j1) * p.kernel[2] + j2;
          const int x = token_index(p, kw.g, qi);
          const int64_t row = (base + x) * H + hk * G;
          for (int g = 0; g < G; ++g)
            acc += to_float(w[(row + g) * W + j]) * to_float(xm[(row + g) * C + c]);
        }
      }
    }
    out[idx] = from_float<T>(acc * p.scale);
  }
}

}  // namespace

cudaError_t naive_in(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  const int64_t total = int64_t(p.batch) * p.extent[0] * p.extent[1] * p.extent[2] *
                        p.heads_kv * p.dim;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    naive_in_kernel<T><<<naive_blocks(total), kNaiveThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace unfused
}  // namespace natten_jax
