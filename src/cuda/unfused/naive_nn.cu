// Naive NN (neighborhood-neighborhood) kernel: one thread per output element out[b, x, h, c],
// the weighted sum of value feature c over the query's window.
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace {

template <typename T>
__global__ void __launch_bounds__(kNaiveThreads) naive_nn_kernel(const __grid_constant__ UnfusedParams p) {
  const int T_ = p.extent[0] * p.extent[1] * p.extent[2];
  const int W = p.window, H = p.heads, C = p.dim;
  const int G = p.heads / p.heads_kv;
  const int64_t total = int64_t(p.batch) * T_ * H * C;
  const T* w = static_cast<const T*>(p.a);
  const T* v = static_cast<const T*>(p.bm);
  T* out = static_cast<T*>(p.out);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = idx;
    const int c = static_cast<int>(rest % C);
    rest /= C;
    const int h = static_cast<int>(rest % H);
    rest /= H;
    const int x = static_cast<int>(rest % T_);
    const int b = static_cast<int>(rest / T_);
    const TokenWindow tw = token_window(p, x);
    const T* wrow = w + ((int64_t(b) * T_ + x) * H + h) * W;
    const T* vb = v + int64_t(b) * T_ * p.heads_kv * C + (h / G) * C + c;
    float acc = 0.f;
    int ki[3];
    for (int j0 = 0; j0 < tw.len[0]; ++j0) {
      ki[0] = tw.start[0] + j0;
      for (int j1 = 0; j1 < tw.len[1]; ++j1) {
        ki[1] = tw.start[1] + j1;
        const int jrow = (j0 * p.kernel[1] + j1) * p.kernel[2];
        for (int j2 = 0; j2 < tw.len[2]; ++j2) {
          ki[2] = tw.start[2] + j2;
          const int y = token_index(p, tw.g, ki);
          acc += to_float(wrow[jrow + j2]) * to_float(vb[int64_t(y) * p.heads_kv * C]);
        }
      }
    }
    out[idx] = from_float<T>(acc * p.scale);
  }
}

}  // namespace

cudaError_t naive_nn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  const int64_t total = int64_t(p.batch) * p.extent[0] * p.extent[1] * p.extent[2] * p.heads *
                        p.dim;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    naive_nn_kernel<T><<<naive_blocks(total), kNaiveThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace unfused
}  // namespace natten_jax
