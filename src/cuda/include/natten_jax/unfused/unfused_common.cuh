// Device helpers shared by the unfused kernels: dtype conversion, token geometry and the
// window of a token. Every window, inverse-neighborhood and mask question is answered by the
// neighborhood policy (natten_jax/neighborhood.cuh); here the unfused kernels' view of it: stride
// 1 on every axis, tokens flattened row-major over the full extents.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/neighborhood.cuh"
#include "natten_jax/unfused/unfused_params.h"

namespace natten_jax {
namespace unfused {

// fp32 <-> element type T (float, __half or __nv_bfloat16) through the types' own conversions
// (round to nearest even).
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// Number of tokens (the product of the extents).
__host__ __device__ __forceinline__ int num_tokens(const UnfusedParams& p) {
  return p.extent[0] * p.extent[1] * p.extent[2];
}

// The window rules of dilation group `group` (flat index, last axis fastest).
__host__ __device__ __forceinline__ Neighborhood group_neighborhood(const UnfusedParams& p,
                                                                    int group) {
  return Neighborhood(p.extent, p.kernel, static_cast<const int*>(nullptr), p.dilation, p.causal,
                      group);
}

// Flat token index of in-group coordinates `i` of the group of `n`.
__device__ __forceinline__ int token_index(const UnfusedParams& p, const Neighborhood& n,
                                           const int* i) {
  return (n.coord(0, i[0]) * p.extent[1] + n.coord(1, i[1])) * p.extent[2] + n.coord(2, i[2]);
}

// Per-axis offsets j[3] of flat window entry `flat` (j = ((j0 * k1) + j1) * k2 + j2).
__device__ __forceinline__ void window_entry(const UnfusedParams& p, int flat, int* j) {
  j[2] = flat % p.kernel[2];
  j[1] = (flat / p.kernel[2]) % p.kernel[1];
  j[0] = flat / (p.kernel[2] * p.kernel[1]);
}

// Flat RPB index of a (query, key) pair given their in-group coordinates.
__device__ __forceinline__ int rpb_index(const UnfusedParams& p, const int* qi, const int* ki) {
  int r = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) r = r * (2 * p.kernel[a] - 1) + (ki[a] - qi[a] + p.kernel[a] - 1);
  return r;
}

__host__ __device__ __forceinline__ int rpb_size(const UnfusedParams& p) {
  return (2 * p.kernel[0] - 1) * (2 * p.kernel[1] - 1) * (2 * p.kernel[2] - 1);
}

// A token's dilation group (its window rules), in-group coordinates and window on every axis.
struct TokenWindow {
  Neighborhood n;
  int i[3];      // in-group index per axis
  int start[3];  // window [start, start + len) of in-group indices
  int len[3];
};

__device__ __forceinline__ TokenWindow token_window(const UnfusedParams& p, int token) {
  int x[3];
  x[2] = token % p.extent[2];
  token /= p.extent[2];
  x[1] = token % p.extent[1];
  x[0] = token / p.extent[1];
  TokenWindow w;
  w.n = Neighborhood::of_token(p.extent, p.kernel, static_cast<const int*>(nullptr), p.dilation,
                               p.causal, x, w.i);
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Interval win = w.n.window(a, w.i[a]);
    w.start[a] = win.lo;
    w.len[a] = win.hi - win.lo;
  }
  return w;
}

}  // namespace unfused
}  // namespace natten_jax
