// The test target of the window math and the neighborhood policy: a small kernel that writes,
// for every token, what window.cuh and neighborhood.cuh answer about it, for tests to compare
// with natten_jax/window.py.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace natten_jax {
namespace kernels {

// Fields per token and axis a, in this order (in-group indices of the token's dilation group):
//   0, 1  start, end            the token's window (window.window_bounds)
//   2, 3  inv_lo, inv_hi        the queries whose windows hold the token as a key
//                               (Neighborhood::inverse; window.inverse_window(i, i, ...))
//   4, 5  union_lo, union_hi    union and intersection of the windows of the query tile that
//   6, 7  inter_lo, inter_hi    holds the token (window.tile_union / tile_intersection)
// Query tiles hold 2^tile_log2[a] in-group tokens per axis, from in-group index 0 (the last
// tile is clipped to the group).
constexpr int kWindowBoundsFields = 8;

// Per-axis parameters as rank-3 arrays, right-aligned: the caller's `rank` spatial axes are the
// last ones; leading axes have extent, kernel, stride and dilation 1 and are not causal.
struct WindowBoundsParams {
  int rank;
  int extent[3], kernel[3], stride[3], dilation[3], causal[3];
  int tile_log2[3];
};

// Writes out[token * rank * kWindowBoundsFields + a * kWindowBoundsFields + field] for every
// token of the spatial shape (row-major, last axis fastest) and caller axis a, i.e. an int32
// array [*spatial, rank, kWindowBoundsFields]. `p` must satisfy the API contract (the FFI
// handler checks it). Asynchronous on `stream`; returns the launch error, if any.
cudaError_t launch_window_bounds(const WindowBoundsParams& p, int32_t* out, cudaStream_t stream);

}  // namespace kernels
}  // namespace natten_jax
