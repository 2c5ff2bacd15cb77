// Window bounds of every query token (see natten_jax/kernels/window_bounds.h).
#include "natten_jax/kernels/window_bounds.h"

#include "natten_jax/window.cuh"

namespace natten_jax {
namespace kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

__global__ void __launch_bounds__(kThreads)
    window_bounds_kernel(const NaAxes axes, int32_t* __restrict__ out, long long num_tokens) {
  const int rank = axes.rank;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
       t < num_tokens; t += static_cast<long long>(gridDim.x) * blockDim.x) {
    // Row-major coordinates, last axis fastest.
    int coord[kMaxRank];
    long long rest = t;
    for (int a = rank - 1; a >= 0; --a) {
      coord[a] = static_cast<int>(rest % axes.extent[a]);
      rest /= axes.extent[a];
    }
    int32_t* dst = out + t * rank * 2;
    for (int a = 0; a < rank; ++a) {
      const WindowBounds w = axes.bounds(a, coord[a]);
      dst[2 * a] = w.start;
      dst[2 * a + 1] = w.end;
    }
  }
}

}  // namespace

cudaError_t launch_window_bounds(const NaAxes& axes, int32_t* out, cudaStream_t stream) {
  if (!axes.valid()) return cudaErrorInvalidValue;
  const long long n = axes.num_tokens();
  long long blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  window_bounds_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(axes, out, n);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace natten_jax
