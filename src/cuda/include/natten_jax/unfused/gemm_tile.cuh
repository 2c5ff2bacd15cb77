// Space-aware tiling of the GEMM-based unfused kernels (shared by PN, NN and IN).
//
// A CTA (4 warps) owns a *row tile* of kRows = 64 tokens of one dilation group, a box of
// 2^l0 x 2^l1 x 2^l2 in-group coordinates (row-major; warp w owns rows 16w..16w+15, which form
// a sub-box), for one batch and head. Its *column box* is the union of what those rows pair
// with: for query rows (PN, NN) the union of their windows, for key rows (IN) the queries whose
// windows hold one of the keys (the inverse neighborhood). The box is walked in chunks of
// kCols = 64 tokens (flat row-major box indices); each chunk's tokens (their features, and a
// table of their coordinates and windows) go to shared memory, and each warp computes the
// dense (16 rows x 64 columns) product block on tensor cores, skipping 8-column groups that lie
// outside its own rows' column box. Attention weights move between the dense block and the
// [tokens, kernel volume] layout through a per-element neighbor test (neighbor_j). Windows,
// their unions and the inverse neighborhood come from the neighborhood policy
// (natten_jax/neighborhood.cuh) of the CTA's dilation group.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace gemm {

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // rows of a tile: 16 per warp
constexpr int kCols = 64;      // columns of a box chunk
constexpr int kOutCols = 64;   // NN / IN: output features per CTA

struct GemmParams {
  UnfusedParams p;
  int tile_log2[3];  // row tile extents 2^l per axis, l0 + l1 + l2 = 6
  int num_tiles[3];  // row tiles per axis, for dilation group 0 (the longest)
  int groups;        // dilation groups, d0 * d1 * d2
  int col_blocks;    // NN / IN: ceil(C / kOutCols) output feature blocks; PN: 1
  int dim_padded;    // PN: C rounded up to the MMA k (16) or to 4 (fp32)
};

// A token of a row tile or of a column chunk (tok < 0: none): flat token index, in-group
// coordinates and window [start, start + len) per axis.
struct Entry {
  int tok;
  int i[3];
  int start[3];
  int len[3];
};

// Where a CTA works.
struct Cta {
  int b, head, cb;  // batch, head of the row operand, output feature block
  Neighborhood nb;  // the window rules of its dilation group (nb.glen: the group's extents)
  int r0[3];        // row tile origin (in-group)
  int blo[3];       // column box origin and extents (in-group)
  int bext[3];
  int nbox;
};

// Columns on axis a that rows [first, last] pair with: the union of the rows' windows (rows are
// queries) or the queries whose windows meet the rows (rows are keys: the inverse neighborhood).
__device__ __forceinline__ Interval column_range(const Neighborhood& nb, int a,
                                                 bool rows_are_queries, int first, int last) {
  return rows_are_queries ? nb.window_union(a, first, last) : nb.inverse(a, first, last);
}

// Decodes blockIdx (x: row tile, y: head * groups + group, z: batch * col_blocks + block).
// Returns false when the tile lies outside this dilation group (groups may be one shorter).
__device__ __forceinline__ bool decode_cta(const GemmParams& gp, bool rows_are_queries, Cta& c) {
  tile_origin(blockIdx.x, gp.num_tiles, gp.tile_log2, c.r0);
  c.nb = group_neighborhood(gp.p, blockIdx.y % gp.groups);
  c.head = blockIdx.y / gp.groups;
  c.b = blockIdx.z / gp.col_blocks;
  c.cb = blockIdx.z % gp.col_blocks;
  c.nbox = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    if (c.r0[a] >= c.nb.glen[a]) return false;
    const Interval cols = column_range(c.nb, a, rows_are_queries, c.r0[a],
                                       c.nb.tile_last(a, c.r0[a], gp.tile_log2[a]));
    c.blo[a] = cols.lo;
    c.bext[a] = cols.hi - cols.lo;
    c.nbox *= cols.hi - cols.lo;
  }
  return true;
}

__device__ __forceinline__ void make_entry(const UnfusedParams& p, const Cta& c, const int* i,
                                           bool active, Entry& e) {
  e.tok = active ? token_index(p, c.nb, i) : -1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    e.i[a] = i[a];
    const Interval w = c.nb.window(a, i[a]);
    e.start[a] = active ? w.lo : 0;
    e.len[a] = active ? w.hi - w.lo : 0;
  }
}

// Entry of row r of the tile.
__device__ __forceinline__ void row_entry(const GemmParams& gp, const Cta& c, int r, Entry& e) {
  int i[3];
  tile_coord(r, gp.tile_log2, i);
  bool active = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    i[a] += c.r0[a];
    active = active && i[a] < c.nb.glen[a];
  }
  make_entry(gp.p, c, i, active, e);
}

// Entry of flat box column n.
__device__ __forceinline__ void col_entry(const GemmParams& gp, const Cta& c, int n, Entry& e) {
  const bool active = n < c.nbox;
  const int m = active ? n : 0;
  int i[3];
  i[2] = c.blo[2] + m % c.bext[2];
  i[1] = c.blo[1] + (m / c.bext[2]) % c.bext[1];
  i[0] = c.blo[0] + m / (c.bext[2] * c.bext[1]);
  make_entry(gp.p, c, i, active, e);
}

// Flat window index j of key `ki` in the window (qs, ql) of a query, or -1 if it is none of
// its neighbors.
__device__ __forceinline__ int neighbor_j(const UnfusedParams& p, const int* qs, const int* ql,
                                          const int* ki) {
  int j = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const int ja = ki[a] - qs[a];
    if (!offset_in_window(ja, ql[a])) return -1;
    j = j * p.kernel[a] + ja;
  }
  return j;
}

// The column box [lo, lo + len) of one warp's rows (16 consecutive rows form a sub-box of the
// tile); active = false when all of its rows lie outside the group.
struct WarpCols {
  bool active;
  int lo[3], len[3];
};

__device__ __forceinline__ WarpCols warp_columns(const GemmParams& gp, const Cta& c,
                                                 bool rows_are_queries, int warp) {
  WarpCols w;
  w.active = true;
  int cf[3], cl[3];
  tile_coord(warp * 16, gp.tile_log2, cf);
  tile_coord(warp * 16 + 15, gp.tile_log2, cl);
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const int first = c.r0[a] + cf[a];
    const int last = min(c.r0[a] + cl[a], c.nb.glen[a] - 1);
    if (first > last) {
      w.active = false;
      w.lo[a] = w.len[a] = 0;
      continue;
    }
    const Interval cols = column_range(c.nb, a, rows_are_queries, first, last);
    w.lo[a] = cols.lo;
    w.len[a] = cols.hi - cols.lo;
  }
  return w;
}

__device__ __forceinline__ bool column_relevant(const WarpCols& w, const Entry& e) {
  return e.tok >= 0 && in_window(e.i[0], w.lo[0], w.len[0]) &&
         in_window(e.i[1], w.lo[1], w.len[1]) && in_window(e.i[2], w.lo[2], w.len[2]);
}

// Bit q (0..7) set: some column 8q..8q+7 of the chunk lies in the warp's column box.
__device__ __forceinline__ unsigned group_mask(const WarpCols& w, const Entry* cols, int lane) {
  const unsigned lo = __ballot_sync(0xffffffffu, column_relevant(w, cols[lane]));
  const unsigned hi = __ballot_sync(0xffffffffu, column_relevant(w, cols[lane + 32]));
  unsigned m = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    m |= (((lo >> (8 * q)) & 0xffu) != 0u) << q;
    m |= (((hi >> (8 * q)) & 0xffu) != 0u) << (q + 4);
  }
  return m;
}

// Copies `rows` rows of `width` elements into shared memory (row pitch `pitch`): row r holds
// elements [0, nvalid) of token ents[r].tok at `base + tok * tok_stride`, zeros elsewhere (and
// for rows without a token). 16-byte loads when every row start and `nvalid` allow them.
template <typename T>
__device__ __forceinline__ void load_rows(T* s, int pitch, const Entry* ents, int rows,
                                          const T* base, int64_t tok_stride, int nvalid,
                                          int width, bool vec_ok, int tid) {
  constexpr int V = 16 / sizeof(T);
  if (vec_ok) {
    const int nv = width / V;
    for (int idx = tid; idx < rows * nv; idx += kThreads) {
      const int r = idx / nv, v = idx % nv;
      const int tok = ents[r].tok;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (tok >= 0 && v * V < nvalid)
        val = __ldg(reinterpret_cast<const uint4*>(base + tok * tok_stride + v * V));
      *reinterpret_cast<uint4*>(s + r * pitch + v * V) = val;
    }
  } else {
    for (int idx = tid; idx < rows * width; idx += kThreads) {
      const int r = idx / width, e = idx % width;
      const int tok = ents[r].tok;
      T val = from_float<T>(0.f);
      if (tok >= 0 && e < nvalid) val = base[tok * tok_stride + e];
      s[r * pitch + e] = val;
    }
  }
}

// Host: row tile shape (log2 extents, sum 6) minimising the columns walked over all tiles (cost
// model: a tile of t rows pairs with about t + k - 1 columns per axis).
inline void choose_row_tile(const UnfusedParams& p, int* l2) {
  const Neighborhood n0 = group_neighborhood(p, 0);  // group 0 is the longest
  long long best = -1;
  for (int l0 = 0; l0 <= 6; ++l0) {
    for (int l1 = 0; l0 + l1 <= 6; ++l1) {
      const int l[3] = {l0, l1, 6 - l0 - l1};
      long long tiles = 1, box = 1;
      bool skip = false;
      for (int a = 0; a < 3; ++a) {
        const int glen = n0.glen[a];
        if (glen == 1 && l[a] > 0) skip = true;  // a tile longer than its axis idles rows
        const int t = 1 << l[a];
        tiles *= tiles_covering(glen, l[a]);
        const int b = t + p.kernel[a] - 1;
        box *= b < glen ? b : glen;
      }
      if (skip) continue;
      const long long cost = tiles * (((box + kCols - 1) / kCols) * kCols + kRows);
      if (best < 0 || cost < best) {
        best = cost;
        l2[0] = l[0];
        l2[1] = l[1];
        l2[2] = l[2];
      }
    }
  }
  if (best < 0) {  // every axis has extent 1: any shape works
    l2[0] = l2[1] = 0;
    l2[2] = 6;
  }
}

// Host: fills the tiling fields of `gp` (gp.p set); returns the grid.
inline dim3 tile_grid(GemmParams& gp, int row_heads) {
  const UnfusedParams& p = gp.p;
  choose_row_tile(p, gp.tile_log2);
  const Neighborhood n0 = group_neighborhood(p, 0);  // group 0 is the longest
  long long tiles = 1;
  gp.groups = 1;
  for (int a = 0; a < 3; ++a) {
    gp.num_tiles[a] = tiles_covering(n0.glen[a], gp.tile_log2[a]);
    tiles *= gp.num_tiles[a];
    gp.groups *= p.dilation[a];
  }
  const long long y = static_cast<long long>(row_heads) * gp.groups;
  const long long z = static_cast<long long>(p.batch) * gp.col_blocks;
  if (tiles > 0x7fffffffLL || y > 65535 || z > 65535) return dim3(0, 0, 0);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// Host: largest dynamic shared memory per block of the current device.
inline int max_dynamic_smem() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  return v;
}

}  // namespace gemm
}  // namespace unfused
}  // namespace natten_jax
