// The dilation group a fused-backward CTA works in, and its window functions in in-group indices
// (shared by the sm80 and sm90 backward kernels).
#pragma once

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/window.cuh"

namespace natten_jax {
namespace fna {

// Group index `grp` runs over the product of the per-axis dilations, last axis fastest.
struct GroupInfo {
  int g[3], glen[3], dil[3], ks[3], st[3];
  bool causal[3];

  __device__ __forceinline__ GroupInfo(const FnaFwdParams& p, int grp) {
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      dil[a] = p.dilation[a];
      g[a] = grp % dil[a];
      grp /= dil[a];
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ks[a] = p.kernel[a];
      st[a] = p.stride[a];
      causal[a] = p.causal[a] != 0;
      glen[a] = group_extent(p.extent[a], dil[a], g[a]);
    }
  }
  __device__ __forceinline__ int start(int a, int i) const {
    return window_start(i, ks[a], st[a], glen[a], causal[a]);
  }
  __device__ __forceinline__ int end(int a, int i) const {
    return window_end(i, start(a, i), ks[a], causal[a]);
  }
};

}  // namespace fna
}  // namespace natten_jax
