// Per-axis neighborhood-attention parameters shared by kernels (plain data, host <-> device).
//
// Axes are stored in the caller's order, axis 0 first; only the first `rank` entries are used.
// Includable from .cu and plain .cc files (no CUDA headers needed).
#pragma once

#include "natten_jax/window.cuh"

namespace natten_jax {

constexpr int kMaxRank = 3;

struct NaAxes {
  int rank;                 // number of spatial axes, 1..3
  int extent[kMaxRank];     // tokens per axis
  int kernel[kMaxRank];     // kernel_size
  int stride[kMaxRank];     // stride (1 <= stride <= kernel)
  int dilation[kMaxRank];   // dilation (kernel * dilation <= extent)
  bool causal[kMaxRank];    // is_causal

  // Window of global coordinate `x` on axis `a`.
  NJ_HOST_DEVICE WindowBounds bounds(int a, int x) const {
    return window_bounds(x, kernel[a], stride[a], dilation[a], extent[a], causal[a]);
  }

  // Total number of query tokens (product of extents).
  NJ_HOST_DEVICE long long num_tokens() const {
    long long n = 1;
    for (int a = 0; a < rank; ++a) n *= extent[a];
    return n;
  }

  // Whether the parameters satisfy the API contract (see docs/API_CONTRACT.md).
  NJ_HOST_DEVICE bool valid() const {
    if (rank < 1 || rank > kMaxRank) return false;
    for (int a = 0; a < rank; ++a) {
      if (extent[a] < 1 || kernel[a] < 1 || dilation[a] < 1 || stride[a] < 1) return false;
      if (stride[a] > kernel[a]) return false;
      if (static_cast<long long>(kernel[a]) * dilation[a] > extent[a]) return false;
    }
    return true;
  }
};

}  // namespace natten_jax
