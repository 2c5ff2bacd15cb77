// RPB gradient: partial sums over chunks of kRpbChunkTokens query tokens,
// partial[chunk, h, r] = sum_b sum_{x in chunk} sum_{j: r(x, j) = r} w[b, x, h, j], in fp32.
// One CTA per (chunk, head); each thread owns bias entries r and walks the chunk's queries
// (their windows cached in shared memory), so every sum has a fixed order (deterministic). The
// caller adds the chunks up.
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace {

constexpr int kRpbThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kRpbThreads)
    rpb_grad_kernel(const __grid_constant__ UnfusedParams p) {
  __shared__ int s_i[kRpbChunkTokens][3], s_start[kRpbChunkTokens][3], s_len[kRpbChunkTokens][3];
  const int T_ = num_tokens(p);
  const int H = p.heads, W = p.window, R = rpb_size(p);
  const int chunk = blockIdx.x, h = blockIdx.y;
  const int x0 = chunk * kRpbChunkTokens;
  const int n = min(kRpbChunkTokens, T_ - x0);
  if (threadIdx.x < n) {
    const TokenWindow tw = token_window(p, x0 + threadIdx.x);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      s_i[threadIdx.x][a] = tw.i[a];
      s_start[threadIdx.x][a] = tw.start[a];
      s_len[threadIdx.x][a] = tw.len[a];
    }
  }
  __syncthreads();
  const T* w = static_cast<const T*>(p.a);
  float* partial = static_cast<float*>(p.out);
  const int r1n = 2 * p.kernel[1] - 1, r2n = 2 * p.kernel[2] - 1;
  for (int r = threadIdx.x; r < R; r += kRpbThreads) {
    int off[3];  // key offset from the query, in dilated steps
    off[2] = r % r2n - (p.kernel[2] - 1);
    off[1] = (r / r2n) % r1n - (p.kernel[1] - 1);
    off[0] = r / (r2n * r1n) - (p.kernel[0] - 1);
    float acc = 0.f;
    for (int t = 0; t < n; ++t) {
      int j = 0;
      bool valid = true;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const int ja = s_i[t][a] + off[a] - s_start[t][a];
        valid = valid && offset_in_window(ja, s_len[t][a]);
        j = j * p.kernel[a] + ja;
      }
      if (!valid) continue;
      for (int b = 0; b < p.batch; ++b)
        acc += to_float(w[((int64_t(b) * T_ + x0 + t) * H + h) * W + j]);
    }
    partial[(int64_t(chunk) * H + h) * R + r] = acc;
  }
}

}  // namespace

cudaError_t rpb_grad_partials(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  const dim3 grid(p.rpb_chunks, p.heads);
  return dispatch_dtype(dtype, [&](auto t) {
    rpb_grad_kernel<decltype(t)><<<grid, kRpbThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace unfused
}  // namespace natten_jax
