// Online softmax (base 2, fp32) over the 64 x 64 or 64 x 128 score fragments of a consumer
// warpgroup of the sm_90a forward kernel (wgmma accumulator layout: thread holds rows grow and
// grow + 8 of its warp's 16, columns 8n + 2 quad + e), with the neighborhood key mask of partly
// visible boxes.
#pragma once

#include <cstdint>

#include "natten_jax/common/fast_exp2.cuh"
#include "natten_jax/fna/sm90_gemm.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {

// Sets the scores of keys whose bit is clear in row mask m[r] (already shifted right by 2 quad)
// to `fill`; sc + 32 h: the 64 columns of 64-key half h of the box (mask m[h]).
template <int NA>
__device__ __forceinline__ void apply_key_mask(float (&sc)[NA], const uint64_t (&m)[NA / 32][2],
                                               float fill) {
#pragma unroll
  for (int h = 0; h < NA / 32; ++h)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (!mask_bit(m[h][r], n, e)) sc[32 * h + 4 * n + 2 * r + e] = fill;
}

// Running maximum (scaled, base 2) and sum of exponentials of the thread's two rows.
struct OnlineSoftmax {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // sc (scores of one box: NA / 4 column groups of 8) becomes P = exp2(scale_log2 * sc - max);
  // alpha[r] is the factor that takes earlier P V sums of row r to the new maximum. The scale
  // (> 0) is folded into the exponent.
  template <int NA>
  __device__ __forceinline__ void step(float (&sc)[NA], float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NA / 4; ++n)
        mx = fmaxf(mx, fmaxf(sc[4 * n + 2 * r], sc[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float m_new = fmaxf(row_max[r], mx * scale_log2);
      const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
      alpha[r] = fast_exp2(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NA / 4; ++n) {
        sc[4 * n + 2 * r] = fast_exp2(fmaf(sc[4 * n + 2 * r], scale_log2, -m_use));
        sc[4 * n + 2 * r + 1] = fast_exp2(fmaf(sc[4 * n + 2 * r + 1], scale_log2, -m_use));
        sum += sc[4 * n + 2 * r] + sc[4 * n + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
  }

  // Row sums over the quad (the full rows); inv[r] = 1 / sum (0 for a row that saw no key) and
  // the natural-log logsumexp (-inf for such a row).
  __device__ __forceinline__ void finish(float (&inv)[2], float (&lse)[2]) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      inv[r] = l > 0.f ? 1.f / l : 0.f;
      lse[r] = l > 0.f ? (row_max[r] + log2f(l)) * 0.69314718055994530942f : -INFINITY;
    }
  }
};

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
