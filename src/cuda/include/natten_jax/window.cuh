// Neighborhood-attention window math for device (and host) code: THE C++ copy of
// natten_jax/window.py. Same function names, arguments and results; tests compare the two
// (tests/test_window_cuda.py). Change both or neither.
//
// Per spatial axis of extent L, kernel k, stride s, dilation d, causal flag c:
//   * token x is in dilation group g = x % d at in-group index i = x / d; the group holds
//     group_extent(L, d, g) tokens;
//   * the window of in-group index i is [window_start, window_end) of in-group indices.
// All arguments are non-negative ints (so C++ division equals Python's floor division).
//
// The divisors (dilation, stride) are ints or FastDivs (fast_div.h: what the fused kernels carry
// in their parameters); the results are the same.
//
// Header-only: includable from .cu (host + device) and plain .cc files.
#pragma once

#include "natten_jax/fast_div.h"

namespace natten_jax {

namespace window_detail {
NJ_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
NJ_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }
}  // namespace window_detail

// Tokens a centred window holds before the query.
NJ_HOST_DEVICE int window_left(int kernel_size) { return kernel_size / 2; }

// Tokens a centred window holds after the query (one fewer than left when k is even).
NJ_HOST_DEVICE int window_right(int kernel_size) { return kernel_size / 2 + kernel_size % 2 - 1; }

// Number of tokens of dilation group `group` on an axis of `extent` tokens.
template <typename Div>
NJ_HOST_DEVICE int group_extent(int extent, const Div& dilation, int group) {
  return quotient(extent - group + static_cast<int>(dilation) - 1, dilation);
}

// First in-group index of the window of in-group query `index` (group of `group_len` tokens).
template <typename Div>
NJ_HOST_DEVICE int window_start(int index, int kernel_size, const Div& stride, int group_len,
                                bool is_causal) {
  using window_detail::imax;
  using window_detail::imin;
  const int s = static_cast<int>(stride), first = quotient(index, stride) * s;
  if (is_causal) {
    const int leader = imin(first + s - 1, group_len - 1);
    return imax(leader - (kernel_size - 1), 0);
  }
  const int leader = imin(first + s / 2, group_len - 1);
  return imin(imax(leader - window_left(kernel_size), 0), group_len - kernel_size);
}

// One past the last in-group index of the window (start + k unless causal).
NJ_HOST_DEVICE int window_end(int index, int start, int kernel_size, bool is_causal) {
  return is_causal ? index + 1 : start + kernel_size;
}

struct WindowBounds {
  int start;  // in-group indices of the query's dilation group: [start, end)
  int end;
};

// Window of global query coordinate `x` on one axis (in-group indices of x's dilation group;
// the neighbors are the global coordinates x % d + d * j for j in [start, end)).
NJ_HOST_DEVICE WindowBounds window_bounds(int x, int kernel_size, int stride, int dilation,
                                          int extent, bool is_causal) {
  const int g = x % dilation;
  const int i = x / dilation;
  const int glen = group_extent(extent, dilation, g);
  const int start = window_start(i, kernel_size, stride, glen, is_causal);
  return WindowBounds{start, window_end(i, start, kernel_size, is_causal)};
}

// Whether key `y` is in the window of query `x` on one axis (global coordinates).
NJ_HOST_DEVICE bool is_neighbor_1d(int x, int y, int kernel_size, int stride, int dilation,
                                   int extent, bool is_causal) {
  if (x % dilation != y % dilation) return false;
  const WindowBounds w = window_bounds(x, kernel_size, stride, dilation, extent, is_causal);
  const int j = y / dilation;
  return j >= w.start && j < w.end;
}

}  // namespace natten_jax
