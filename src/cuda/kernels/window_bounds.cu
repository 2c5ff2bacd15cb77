// What the neighborhood policy answers for every token (see natten_jax/kernels/window_bounds.h).
#include "natten_jax/kernels/window_bounds.h"

#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

__global__ void __launch_bounds__(kThreads)
    window_bounds_kernel(const WindowBoundsParams p, int32_t* __restrict__ out,
                         long long num_tokens) {
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
       t < num_tokens; t += static_cast<long long>(gridDim.x) * blockDim.x) {
    int x[3];  // row-major coordinates, last axis fastest
    long long rest = t;
    for (int a = 2; a >= 0; --a) {
      x[a] = static_cast<int>(rest % p.extent[a]);
      rest /= p.extent[a];
    }
    int i[3];
    const Neighborhood n =
        Neighborhood::of_token(p.extent, p.kernel, p.stride, p.dilation, p.causal, x, i);
    int32_t* dst = out + t * p.rank * kWindowBoundsFields;
    for (int a = 3 - p.rank; a < 3; ++a, dst += kWindowBoundsFields) {
      const int l = p.tile_log2[a];
      const int first = (i[a] >> l) << l;
      const int last = n.tile_last(a, first, l);
      const Interval fields[4] = {n.window(a, i[a]), n.inverse(a, i[a], i[a]),
                                  n.window_union(a, first, last),
                                  n.window_intersection(a, first, last)};
      for (int f = 0; f < 4; ++f) {
        dst[2 * f] = fields[f].lo;
        dst[2 * f + 1] = fields[f].hi;
      }
    }
  }
}

}  // namespace

cudaError_t launch_window_bounds(const WindowBoundsParams& p, int32_t* out, cudaStream_t stream) {
  const long long n = static_cast<long long>(p.extent[0]) * p.extent[1] * p.extent[2];
  long long blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  window_bounds_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, out, n);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace natten_jax
