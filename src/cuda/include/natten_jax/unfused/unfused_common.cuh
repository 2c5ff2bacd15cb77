// Device helpers shared by the unfused kernels: dtype conversions, token / group geometry and
// the inverse neighborhood of a range of keys. The window math itself is window.cuh's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/unfused/unfused_params.h"
#include "natten_jax/window.cuh"

namespace natten_jax {
namespace unfused {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Queries (in-group indices) whose windows intersect the keys [y0, y1] of one axis, as the
// interval [*lo, *hi) (stride 1). The window of query i holds i and at most k tokens, so only
// i in [y0 - k + 1, y1 + k - 1] can qualify; window starts and ends are non-decreasing in i, so
// the qualifying queries (end > y0 and start <= y1) form an interval, found by scanning in from
// both ends. Requires 0 <= y0 <= y1 < group_len.
__host__ __device__ __forceinline__ void inverse_range(int y0, int y1, int kernel_size,
                                                       int group_len, bool causal, int* lo,
                                                       int* hi) {
  int a = y0 - kernel_size + 1 > 0 ? y0 - kernel_size + 1 : 0;
  int b = y1 + kernel_size - 1 < group_len - 1 ? y1 + kernel_size - 1 : group_len - 1;
  while (a < b &&
         window_end(a, window_start(a, kernel_size, 1, group_len, causal), kernel_size, causal) <=
             y0)
    ++a;
  while (b > a && window_start(b, kernel_size, 1, group_len, causal) > y1) --b;
  *lo = a;
  *hi = b + 1;
}

// Flat token index (row-major over the full extents) of in-group coordinates `i` of dilation
// group `g`.
__device__ __forceinline__ int token_index(const UnfusedParams& p, const int* g, const int* i) {
  return ((g[0] + p.dilation[0] * i[0]) * p.extent[1] + (g[1] + p.dilation[1] * i[1])) *
             p.extent[2] +
         (g[2] + p.dilation[2] * i[2]);
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

// A token's dilation group, in-group coordinates and window on every axis.
struct TokenWindow {
  int g[3];      // dilation group per axis
  int i[3];      // in-group index per axis
  int glen[3];   // group extent per axis
  int start[3];  // window [start, start + len) of in-group indices
  int len[3];
};

__device__ __forceinline__ TokenWindow token_window(const UnfusedParams& p, int token) {
  TokenWindow w;
  int x[3];
  x[2] = token % p.extent[2];
  token /= p.extent[2];
  x[1] = token % p.extent[1];
  x[0] = token / p.extent[1];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    w.g[a] = x[a] % p.dilation[a];
    w.i[a] = x[a] / p.dilation[a];
    w.glen[a] = group_extent(p.extent[a], p.dilation[a], w.g[a]);
    const bool c = p.causal[a] != 0;
    w.start[a] = window_start(w.i[a], p.kernel[a], 1, w.glen[a], c);
    w.len[a] = window_end(w.i[a], w.start[a], p.kernel[a], c) - w.start[a];
  }
  return w;
}

}  // namespace unfused
}  // namespace natten_jax
