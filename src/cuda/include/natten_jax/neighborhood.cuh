// The neighborhood policy: every question a kernel asks about which keys a query sees, answered
// once for all fused and unfused kernels, on top of the per-axis window rules of window.cuh.
//
//   * Neighborhood: the dilation group a CTA works in (group index -> per-axis group offset,
//     group extent) and, per axis, the window of an in-group query (`start`, `end`, `window`).
//   * Ranges of a run of queries [first, last] on one axis (window bounds are non-decreasing in
//     the query, so the first and last query bound them): the union of their windows (the KV
//     range a query tile or a warp visits) and their intersection (keys every one of them sees).
//   * The inverse neighborhood: the queries whose windows meet a run of keys [y0, y1] (what a
//     key-stationary kernel, dK/dV or the unfused IN product, visits).
//   * Tiles and boxes: decoding a flat tile index into per-axis origins, the in-group extent of a
//     tile, and the classification of a box of keys against a set of windows as invisible
//     (skipped), fully visible (no mask) or partly visible (masked) per axis.
//   * Masks: the key-in-window test and the 64-bit key masks of a 64- or 128-token box
//     (BoxKeyMask).
//
// The Python ground truth of every function here is natten_jax/window.py (window_bounds,
// inverse_window, tile_union); tests/test_window_cuda.py compares the two through the
// natten_jax_window_bounds test target. Kernels keep their own loop structure and fragment
// layouts; the arithmetic of windows and masks lives here.
//
// Ragged batches: a sample's Neighborhood is built from its own extent (sample_extent), so every
// window, union and inverse stays inside the sample; kernels store up to the tensor's extent
// (zeros past the sample's). Extension points (each one addition here): a query / KV offset
// (context parallelism) shifts
// the coordinates `start` and `end` see; a score bias (RPB) is a function of the (query, key)
// in-group offsets that the kernels add where they apply the mask.
#pragma once

#include <cstdint>

#include "natten_jax/window.cuh"

namespace natten_jax {

// The extent of a sample of a ragged batch on one axis: its valid extent clamped to
// [kernel * dilation, extent] (the smallest extent the window rules allow, and the tensor's).
// Python: window.sample_extent.
NJ_HOST_DEVICE int sample_extent(int valid, int kernel, int dilation, int extent) {
  return window_detail::imin(window_detail::imax(valid, kernel * dilation), extent);
}

// In-group indices [lo, hi) on one axis (empty when hi <= lo).
struct Interval {
  int lo, hi;
};

// How a Neighborhood holds the per-axis dilations and strides: ints by value; FastDivs
// (fast_div.h) by pointer into the arrays they were built from, the fused kernels' parameters,
// so that a kernel reads their multipliers from constant memory where it divides rather than
// holding them in registers across its main loop (copies cost the sm80 dK/dV kernel 12
// registers). Indexes like an array and converts to a pointer to its first element.
template <typename Div>
struct AxisDivisors {
  Div v[3];
  NJ_HOST_DEVICE void set(const Div* src) {
#pragma unroll
    for (int a = 0; a < 3; ++a) v[a] = src ? src[a] : Div(1);
  }
  NJ_HOST_DEVICE const Div& operator[](int a) const { return v[a]; }
  NJ_HOST_DEVICE operator const Div*() const { return v; }
};
template <>
struct AxisDivisors<FastDiv> {
  const FastDiv* v;  // not null: the fused kernels pass every array
  NJ_HOST_DEVICE void set(const FastDiv* src) { v = src; }
  NJ_HOST_DEVICE const FastDiv& operator[](int a) const { return v[a]; }
  NJ_HOST_DEVICE operator const FastDiv*() const { return v; }
};

// Window rules of the dilation group `group` (flat index over the per-axis dilations, last
// axis fastest) of a rank-3 problem (rank-1/2 problems pad leading axes with extent, kernel,
// stride and dilation 1). `stride` may be null with int divisors (unfused kernels: stride 1 on
// every axis). Div, the type of the dilations and strides: int, or FastDiv where the kernel
// parameters carry them so (the fused kernels: fna::Neighborhood); the answers are the same.
template <typename Div>
struct BasicNeighborhood {
  int g[3];     // the group's offset on each axis (global coordinate = g + dil * in-group index)
  int glen[3];  // the group's extent on each axis
  AxisDivisors<Div> dil, st;
  int ks[3];
  bool causal[3];

  BasicNeighborhood() = default;

  template <typename IntT, typename CausalT>
  NJ_HOST_DEVICE BasicNeighborhood(const IntT* extent, const IntT* kernel, const Div* stride,
                                   const Div* dilation, const CausalT* is_causal, int group) {
    dil.set(dilation);
#pragma unroll
    for (int a = 2; a >= 0; --a) group = divmod(group, dil[a], g[a]);
    set_axes(extent, kernel, stride, is_causal);
  }

  // The group that holds the token at global coordinates x[3]; x's in-group indices go to i[3]
  // (per-token kernels: the unfused naive kernels, the window_bounds test target).
  template <typename IntT, typename CausalT>
  static NJ_HOST_DEVICE BasicNeighborhood of_token(const IntT* extent, const IntT* kernel,
                                                   const Div* stride, const Div* dilation,
                                                   const CausalT* is_causal, const int* x,
                                                   int* i) {
    BasicNeighborhood n;
    n.dil.set(dilation);
#pragma unroll
    for (int a = 0; a < 3; ++a) i[a] = divmod(x[a], n.dil[a], n.g[a]);
    n.set_axes(extent, kernel, stride, is_causal);
    return n;
  }

  // Global coordinate on axis a of in-group index i.
  NJ_HOST_DEVICE int coord(int a, int i) const { return g[a] + static_cast<int>(dil[a]) * i; }

  // Window [start, end) of in-group query i on axis a.
  NJ_HOST_DEVICE int start(int a, int i) const {
    return window_start(i, ks[a], st[a], glen[a], causal[a]);
  }
  NJ_HOST_DEVICE int end(int a, int i) const {
    return window_end(i, start(a, i), ks[a], causal[a]);
  }
  NJ_HOST_DEVICE Interval window(int a, int i) const {
    const int s = start(a, i);
    return Interval{s, window_end(i, s, ks[a], causal[a])};
  }

  // Union of the windows of queries [first, last] on axis a (first <= last).
  NJ_HOST_DEVICE Interval window_union(int a, int first, int last) const {
    const int s_last = start(a, last);
    return Interval{start(a, first), window_end(last, s_last, ks[a], causal[a])};
  }
  // Intersection of the windows of queries [first, last] on axis a (empty if hi <= lo).
  NJ_HOST_DEVICE Interval window_intersection(int a, int first, int last) const {
    const int s_first = start(a, first);
    return Interval{start(a, last), window_end(first, s_first, ks[a], causal[a])};
  }

  // The queries whose windows meet keys [y0, y1] on axis a, searched in [lo, hi) (a range known
  // to hold them all): queries i with end(i) > y0 and start(i) <= y1, an interval since both
  // bounds are non-decreasing in i; empty if no query qualifies.
  NJ_HOST_DEVICE Interval inverse(int a, int y0, int y1, int lo, int hi) const {
    return Interval{first_query(lo, hi, a, y0, true), first_query(lo, hi, a, y1, false)};
  }
  // The same for 0 <= y0 <= y1 < glen[a], searched where they can be: a window holds its query
  // and at most ks[a] keys, so y0 - ks < i < y1 + ks (the interval is never empty: query y0
  // qualifies). Python: window.inverse_window.
  NJ_HOST_DEVICE Interval inverse(int a, int y0, int y1) const {
    return inverse(a, y0, y1, window_detail::imax(y0 - ks[a] + 1, 0),
                   window_detail::imin(y1 + ks[a], glen[a]));
  }

  // Last in-group index of a tile of 2^l tokens from `origin` on axis a, clipped to the group.
  NJ_HOST_DEVICE int tile_last(int a, int origin, int l) const {
    return window_detail::imin(origin + (1 << l), glen[a]) - 1;
  }

 private:
  // The per-axis rules once dil[] and g[] are set.
  template <typename IntT, typename CausalT>
  NJ_HOST_DEVICE void set_axes(const IntT* extent, const IntT* kernel, const Div* stride,
                               const CausalT* is_causal) {
    st.set(stride);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ks[a] = kernel[a];
      causal[a] = is_causal[a] != 0;
      glen[a] = group_extent(extent[a], dil[a], g[a]);
    }
  }

  // Smallest i in [lo, hi) with end(i) > y (by_end) or start(i) > y (!by_end); hi if none.
  NJ_HOST_DEVICE int first_query(int lo, int hi, int a, int y, bool by_end) const {
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if ((by_end ? end(a, mid) : start(a, mid)) > y)
        hi = mid;
      else
        lo = mid + 1;
    }
    return lo;
  }
};

// The window rules with int divisors (unfused kernels, host code).
using Neighborhood = BasicNeighborhood<int>;

// Local coordinates of row r of a tile of 2^l[0] x 2^l[1] x 2^l[2] tokens (row-major).
NJ_HOST_DEVICE void tile_coord(int r, const int* l, int* c) {
  c[2] = r & ((1 << l[2]) - 1);
  c[1] = (r >> l[2]) & ((1 << l[1]) - 1);
  c[0] = r >> (l[1] + l[2]);
}

// Per-axis tile origins (in-group) of flat tile index t over count[0] x count[1] x count[2]
// tiles of 2^l[a] tokens (last axis fastest); counts: ints or FastDivs.
template <typename Div>
NJ_HOST_DEVICE void tile_origin(int t, const Div* count, const int* l, int* o) {
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    t = divmod(t, count[a], o[a]);
    o[a] <<= l[a];
  }
}

// Tiles of 2^l tokens that cover `extent` tokens.
NJ_HOST_DEVICE int tiles_covering(int extent, int l) { return (extent + (1 << l) - 1) >> l; }

// The windows of rows [r0, r0 + n) of a query tile at in-group origin q0 (log2 extents l; n a
// power of two dividing the tile and r0 a multiple of n, so the rows form a sub-box of the tile):
// per axis the union [ulo, uhi) and the intersection [ilo, ihi) of their windows (either pair may
// be null). Rows past the group's extent take the window of the last row inside it (kernels
// compute such rows and never store them). Returns whether the first row lies inside the group.
template <typename Div>
NJ_HOST_DEVICE bool rows_windows(const BasicNeighborhood<Div>& nb, const int* q0, const int* l,
                                 int r0, int n, int* ulo, int* uhi, int* ilo, int* ihi) {
  int cf[3], cl[3];
  tile_coord(r0, l, cf);
  tile_coord(r0 + n - 1, l, cl);
  bool active = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    int first = q0[a] + cf[a];
    const int last = window_detail::imin(q0[a] + cl[a], nb.glen[a] - 1);
    active = active && first < nb.glen[a];
    first = window_detail::imin(first, nb.glen[a] - 1);
    if (ulo) {
      const Interval u = nb.window_union(a, first, last);
      ulo[a] = u.lo;
      uhi[a] = u.hi;
    }
    if (ilo) {
      const Interval i = nb.window_intersection(a, first, last);
      ilo[a] = i.lo;
      ihi[a] = i.hi;
    }
  }
  return active;
}

// The window of row r of a query tile at in-group origin q0 (log2 extents l) on axis a, a row
// past the group's extent taking the last row's window (see rows_windows).
template <typename Div>
NJ_HOST_DEVICE Interval row_window(const BasicNeighborhood<Div>& nb, const int* q0,
                                   const int* l, int r, int a) {
  int c[3];
  tile_coord(r, l, c);
  return nb.window(a, window_detail::imin(q0[a] + c[a], nb.glen[a] - 1));
}

// Whether in-group key y lies in the window [start, start + len) (one unsigned compare; callers
// that hoist `y - start` out of a loop pass offset = y - start to offset_in_window).
NJ_HOST_DEVICE bool offset_in_window(int offset, unsigned len) {
  return static_cast<unsigned>(offset) < len;
}
NJ_HOST_DEVICE bool in_window(int y, int start, unsigned len) {
  return offset_in_window(y - start, len);
}

// How a box of keys [o, o + 2^l) per axis meets a set of windows whose union is [ulo, uhi) and
// whose intersection is [ilo, ihi) per axis: `touch` if it meets the union on every axis (and
// the windows' queries exist: `active`), full[a] if it lies inside the intersection on axis a
// (no mask needed on that axis).
NJ_HOST_DEVICE void classify_box(const int* o, const int* l, const int* ulo, const int* uhi,
                                 const int* ilo, const int* ihi, bool active, bool& touch,
                                 bool (&full)[3]) {
  touch = active;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const int box_hi = o[a] + (1 << l[a]);
    touch = touch && o[a] < uhi[a] && box_hi > ulo[a];
    full[a] = o[a] >= ilo[a] && box_hi <= ihi[a];
  }
}

// Key masks of a box of 2^l[0] x 2^l[1] x 2^l[2] tokens, 64 or 128 (row-major: token index
// c0 << sh0 | c1 << sh1 | c2), as 64-bit words (word h: tokens [64h, 64h + 64)): the tokens whose
// coordinate on axis a lies in [lo, hi) are bits [lo << sh[a], hi << sh[a]) of every period of
// 2^(l[a] + sh[a]) bits, i.e. that interval times rep[a] (ones at the period starts) where the
// period is at most 64 bits (the same in every word), and that interval less 64h in word h
// where the period is the whole 128-token box (wide[a] = 64).
struct BoxKeyMask {
  int sh[3], ext[3], wide[3];
  uint64_t rep[3];

  // Bits [0, n) set, n in [0, 64].
  static NJ_HOST_DEVICE uint64_t low_bits(int n) { return n >= 64 ? ~0ull : ((1ull << n) - 1ull); }

  NJ_HOST_DEVICE explicit BoxKeyMask(const int* l) {
    sh[2] = 0;
    sh[1] = l[2];
    sh[0] = l[1] + l[2];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ext[a] = 1 << l[a];
      wide[a] = l[a] + sh[a] > 6 ? 64 : 0;
      rep[a] = 1ull;
      for (int period = 1 << (l[a] + sh[a]); period < 64; period <<= 1) rep[a] |= rep[a] << period;
    }
  }
  // Word H of the mask of the tokens of the box at `org` whose coordinate lies in [lo[a], hi[a])
  // on every axis a with !full[a] (axes with full[a] are not tested).
  template <int H = 0>
  NJ_HOST_DEVICE uint64_t mask(const int (&lo)[3], const int (&hi)[3], const int (&org)[3],
                               const bool (&full)[3]) const {
    uint64_t m = ~0ull;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      if (full[a]) continue;
      const int klo = window_detail::imin(window_detail::imax(lo[a] - org[a], 0), ext[a]);
      const int khi = window_detail::imax(window_detail::imin(hi[a] - org[a], ext[a]), 0);
      int blo = klo << sh[a], bhi = khi << sh[a];  // in [0, 64], or [0, 128] if wide
      if constexpr (H > 0) {
        blo = window_detail::imax(blo - H * wide[a], 0);
        bhi = window_detail::imax(bhi - H * wide[a], 0);
      }
      const uint64_t iv = low_bits(bhi) & ~low_bits(blo);
      m &= a == 0 ? iv : iv * rep[a];  // axis 0's period is the whole box
    }
    return m;
  }
};

}  // namespace natten_jax
