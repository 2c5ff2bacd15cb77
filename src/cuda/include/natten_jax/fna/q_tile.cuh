// The query tile a CTA of the forward and dQ kernels owns (sm80 and sm90 alike): its (batch,
// head, dilation group), the group's window rules, the tile origin and the KV range it visits,
// i.e. the union of its queries' windows in boxes of the KV tile shape (neighborhood policy).
// Also the ragged-batch helpers every fused kernel shares: a sample's extents, and the zero fill
// of a tile that lies wholly outside its sample.
#pragma once

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {

// The window rules in the fused kernels: divisions by the dilations and strides of the
// parameters (FastDiv) cost a multiply and a shift.
using Neighborhood = BasicNeighborhood<FastDiv>;

// The extents of sample b: p.extent, or in a ragged batch its valid extents (clamped by the
// policy's sample_extent; p.valid_extent holds the last p.valid_rank axes).
__device__ __forceinline__ void sample_extents(const FnaFwdParams& p, int b, int (&ext)[3]) {
#pragma unroll
  for (int a = 0; a < 3; ++a) ext[a] = p.extent[a];
  if (p.valid_extent != nullptr) {
    const int* v = p.valid_extent + static_cast<int64_t>(b) * p.valid_rank - (3 - p.valid_rank);
#pragma unroll
    for (int a = 0; a < 3; ++a)
      if (a >= 3 - p.valid_rank)
        ext[a] = sample_extent(v[a], p.kernel[a], p.dilation[a], p.extent[a]);
  }
}

// The tokens of dilation group nb.g on each axis of the tensor (nb.glen: of the sample; equal
// unless the batch is ragged): rows below it are stored, rows in [nb.glen, span) as zeros.
__device__ __forceinline__ void group_span(const FnaFwdParams& p, const Neighborhood& nb,
                                           int (&span)[3]) {
#pragma unroll
  for (int a = 0; a < 3; ++a)
    span[a] = p.valid_extent ? group_extent(p.extent[a], nb.dil[a], nb.g[a]) : nb.glen[a];
}

// Zeros into the rows of a tile (in-group origin o, log2 extents l) below `span` on every axis:
// kRowElems elements of T per row (16-byte chunks) at base + token offset (in-group step st[a]
// elements per axis), and, if lse is not null, one float per row at lse + the token's offset
// (step lst[a]). n threads from thread t.
template <typename T, int kRowElems>
__device__ __forceinline__ void zero_tile(T* base, const int64_t* st, float* lse,
                                          const int64_t* lst, const int* o, const int* span,
                                          const int* l, int t, int n) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunks = kRowElems / kVec;
  const int rows = 1 << (l[0] + l[1] + l[2]);
  for (int idx = t; idx < rows * kChunks; idx += n) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    int c[3];
    tile_coord(row, l, c);
    bool valid = true;
    int64_t off = 0, loff = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = o[a] + c[a];
      valid = valid && x < span[a];
      off += static_cast<int64_t>(x) * st[a];
      if (lse) loff += static_cast<int64_t>(x) * lst[a];
    }
    if (!valid) continue;
    *reinterpret_cast<uint4*>(base + off + chunk * kVec) = make_uint4(0u, 0u, 0u, 0u);
    if (lse && chunk == 0) lse[loff] = 0.f;
  }
}

// Element offset of a dilation group's first token (goff) and element stride of one in-group
// step per axis (st) in a heads-last tensor with token strides tok_stride.
__device__ __forceinline__ void group_layout(const int* g, const FastDiv* dil,
                                             const int64_t* tok_stride, int64_t& goff,
                                             int64_t (&st)[3]) {
  goff = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff += static_cast<int64_t>(g[a]) * tok_stride[a];
    st[a] = static_cast<int64_t>(dil[a]) * tok_stride[a];
  }
}

// Zeros into the rows (below span) of a key tile at in-group origin k0 (log2 extents
// p.kv_tile_log2) of x, laid out like k, for batch b, key/value head hkv and the group of nb:
// what a dK/dV kernel stores for a tile outside its sample. n threads from thread t.
template <typename T, int D>
__device__ __forceinline__ void store_kv_zeros(const FnaFwdParams& p, void* x,
                                               const Neighborhood& nb, const int* span, int b,
                                               int hkv, const int* k0, int t, int n) {
  int64_t goff, st[3];
  group_layout(nb.g, nb.dil, p.kv_token_stride, goff, st);
  T* base = static_cast<T*>(x) + b * p.kv_batch_stride + goff + hkv * p.kv_head_stride;
  zero_tile<T, D>(base, st, nullptr, st, k0, span, p.kv_tile_log2, t, n);
}

struct QTileWork {
  int b, h, hkv;
  Neighborhood nb;            // the CTA's dilation group and its window rules (of the sample)
  bool padded;                // the tile lies outside the sample (zeros to store)
  int q0[3];                  // tile origin (in-group)
  int ql[3], kl[3];           // log2 extents of the Q tile and of a KV box
  int lo[3], hi[3], nbox[3];  // union of the tile's windows [lo, hi) and KV boxes per axis
  int total;                  // KV boxes

  // From the block index (x: Q tile, y: head x dilation group, z: batch). False if the tile
  // lies past the end of its dilation group (groups can be one token shorter than group 0, for
  // which the grid is sized) or, with `padded` set, past its sample's extent (ragged batches:
  // the caller stores zeros): the CTA computes nothing.
  __device__ __forceinline__ bool init(const FnaFwdParams& p) {
    b = blockIdx.z;
    const int group = divmod(static_cast<int>(blockIdx.y), p.heads, h);
    hkv = quotient(h, p.heads_per_kv);
    int ext[3];
    sample_extents(p, b, ext);
    nb = Neighborhood(ext, p.kernel, p.stride, p.dilation, p.causal, group);
    int span[3];
    group_span(p, nb, span);
    tile_origin(blockIdx.x, p.num_q_tiles, p.q_tile_log2, q0);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ql[a] = p.q_tile_log2[a];
      kl[a] = p.kv_tile_log2[a];
    }
    padded = false;
    if (q0[0] >= span[0] || q0[1] >= span[1] || q0[2] >= span[2]) return false;
    if (q0[0] >= nb.glen[0] || q0[1] >= nb.glen[1] || q0[2] >= nb.glen[2]) {
      padded = true;
      return false;
    }
    total = 1;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Interval u = nb.window_union(a, q0[a], nb.tile_last(a, q0[a], ql[a]));
      lo[a] = u.lo;
      hi[a] = u.hi;
      nbox[a] = tiles_covering(u.hi - u.lo, kl[a]);
      total *= nbox[a];
    }
    return true;
  }

  // Zeros into the tile's rows (below span) of x, laid out like q, and of lse (if not null),
  // laid out like the logsumexp: what a padded tile stores. n threads from thread t.
  template <typename T, int D>
  __device__ __forceinline__ void store_zeros(const FnaFwdParams& p, void* x, float* lse, int t,
                                              int n) const {
    int64_t goff, st[3], lgoff, lst[3];
    group_layout(nb.g, nb.dil, p.q_token_stride, goff, st);
    group_layout(nb.g, nb.dil, p.lse_token_stride, lgoff, lst);
    T* base = static_cast<T*>(x) + b * p.q_batch_stride + goff + h * p.q_head_stride;
    float* lbase = lse ? lse + b * p.lse_batch_stride + lgoff + h : nullptr;
    int span[3];
    group_span(p, nb, span);
    zero_tile<T, D>(base, st, lbase, lst, q0, span, ql, t, n);
  }

  // Whether tile row r lies inside the sample (false: a padded query, stored as zero when
  // below span).
  __device__ __forceinline__ bool row_inside(int r) const {
    int c[3];
    tile_coord(r, ql, c);
    return q0[0] + c[0] < nb.glen[0] && q0[1] + c[1] < nb.glen[1] && q0[2] + c[2] < nb.glen[2];
  }

  // Origin (in-group) of the KV box with per-axis box indices bi.
  __device__ __forceinline__ void box_origin(const int (&bi)[3], int (&o)[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) o[a] = lo[a] + (bi[a] << kl[a]);
  }
};

// The early exits of a ragged batch, not inlined: inlined, their index arithmetic raised the
// register use of the kernels' main loops (the sm90 dK/dV kernel spilled ~100 bytes, the 16-bit
// backward ran 5-10% slower without any ragged argument), though only these exits run them.
//
// A Q tile outside its sample (QTileWork::init set `padded`): zeros into its rows of x (laid
// out like q) and of lse (if not null). n threads.
template <typename T, int D>
__device__ __noinline__ void store_padded_q_tile(const FnaFwdParams& p, void* x, float* lse,
                                                 int n) {
  QTileWork tile;
  tile.init(p);
  tile.store_zeros<T, D>(p, x, lse, static_cast<int>(threadIdx.x), n);
}

// The key tile of a dK/dV CTA (block x: tile, y: key/value head x dilation group, z: batch)
// when it lies past its sample's group: zero dK and dV for its rows inside the tensor's group
// (none if it lies past that too). n threads.
template <typename T, int D>
__device__ __noinline__ void store_padded_kv_tile(const FnaBwdParams& bp, int n) {
  const FnaFwdParams& p = bp.f;
  const int b = static_cast<int>(blockIdx.z), y = static_cast<int>(blockIdx.y);
  int hkv;
  const int group = divmod(y, p.heads_kv, hkv);
  int ext[3], span[3], k0[3];
  sample_extents(p, b, ext);
  const Neighborhood gi(ext, p.kernel, p.stride, p.dilation, p.causal, group);
  group_span(p, gi, span);
  tile_origin(static_cast<int>(blockIdx.x), bp.num_kv_tiles, p.kv_tile_log2, k0);
  if (k0[0] >= span[0] || k0[1] >= span[1] || k0[2] >= span[2]) return;
  const int t = static_cast<int>(threadIdx.x);
  store_kv_zeros<T, D>(p, bp.dk, gi, span, b, hkv, k0, t, n);
  store_kv_zeros<T, D>(p, bp.dv, gi, span, b, hkv, k0, t, n);
}

}  // namespace fna
}  // namespace natten_jax
