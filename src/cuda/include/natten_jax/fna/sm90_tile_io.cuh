// Moving multi-dimensional token tiles between global memory (heads-last [B, *S, H, D]) and the
// swizzled shared-memory layout of sm90_common.cuh, for the sm_90a fused kernels: the producer's
// predicated cp.async loader, and the consumers' accumulator staging and 16-byte stores.
//
// A tile of kRows tokens (a box of 2^l[0] x 2^l[1] x 2^l[2] tokens of one dilation group, row r
// = token origin + tile_coord(r)) is stored as D / 64 column blocks of kRows x 128 bytes.
#pragma once

#include <cstdint>

#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/sm90_gemm.cuh"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {

constexpr int kWGThreads = 128;  // threads per warpgroup

// Producer-side loader (one warpgroup): kRowThreads threads share a row (8: a thread moves
// 16-byte chunk `chunk` of every 64-element column block, 16 rows per pass; D / 8: one chunk
// each, 128 / (D / 8) rows per pass), and thread pt moves rows rsub + i * kRowsPerPass.
template <typename T, int D, int kRows = 64, int kRowThreads = 8>
struct TileLoader {
  static_assert(kRowThreads % 8 == 0 && (D / 8) % kRowThreads == 0, "threads per row");
  static constexpr int kChunksPerThread = (D / 8) / kRowThreads;  // 16-byte chunks of a row
  static constexpr int kBlockBytes = kRows * kRowBytes;
  static constexpr int kRowsPerPass = kWGThreads / kRowThreads;  // a multiple of the 8-row atom
  static constexpr int kPasses = kRows / kRowsPerPass;
  int chunk, rsub;
  uint32_t col;  // byte offset of this thread's first chunk within its row of the tile (swizzled)

  __device__ __forceinline__ explicit TileLoader(int pt)
      : chunk(pt % kRowThreads), rsub(pt / kRowThreads) {
    col = static_cast<uint32_t>((chunk >> 3) * kBlockBytes + (((chunk & 7) ^ (rsub & 7)) << 4));
  }
  // Element offsets from a tile's origin row of this thread's rows (tile of log2 extents l;
  // st: element stride of one in-group step per axis).
  __device__ __forceinline__ void row_offsets(const int* l, const int64_t* st,
                                              int64_t (&off)[kPasses]) const {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      int cc[3];
      tile_coord(rsub + i * kRowsPerPass, l, cc);
      off[i] = cc[0] * st[0] + cc[1] * st[1] + cc[2] * st[2];
    }
  }
  // Rows of N tensors sharing a layout (src[i]: the tile origin's row, chunk * 8 elements in)
  // into the tiles at shared addresses dst[i]; a row whose coordinate o + c reaches `lim` on some
  // axis is zero-filled (only tested when !interior).
  template <int N>
  __device__ __forceinline__ void load(const uint32_t (&dst)[N], const T* const (&src)[N],
                                       const int64_t (&off)[kPasses], bool interior,
                                       const int* o, const int* lim, const int* l) const {
    if (interior) {  // two code paths: the common interior tile computes no predicates
#pragma unroll
      for (int i = 0; i < kPasses; ++i) load_row(dst, src, rsub + i * kRowsPerPass, off[i], true);
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = rsub + i * kRowsPerPass;
        int cc[3];
        tile_coord(r, l, cc);
        const bool valid =
            o[0] + cc[0] < lim[0] && o[1] + cc[1] < lim[1] && o[2] + cc[2] < lim[2];
        load_row(dst, src, r, valid ? off[i] : 0, valid);
      }
    }
  }

 private:
  template <int N>
  __device__ __forceinline__ void load_row(const uint32_t (&dst)[N], const T* const (&src)[N],
                                           int r, int64_t e, bool valid) const {
#pragma unroll
    for (int k = 0; k < kChunksPerThread; ++k) {
      const uint32_t d = col + k * (kRowThreads / 8) * kBlockBytes + r * kRowBytes;
#pragma unroll
      for (int t = 0; t < N; ++t) cp_async16(dst[t] + d, src[t] + e + k * kRowThreads * 8, valid);
    }
  }
};

// Whether a tile of log2 extents l at in-group origin o lies below `lim` on every axis (its rows
// need no predicate).
__device__ __forceinline__ bool tile_inside(const int* o, const int* l, const int* lim) {
  return o[0] + (1 << l[0]) <= lim[0] && o[1] + (1 << l[1]) <= lim[1] &&
         o[2] + (1 << l[2]) <= lim[2];
}

// Stores a 64 x D accumulator fragment (rows 16 warp + grow (+8) of the 64 rows at tile_addr,
// row h times mul[h]) as T into a swizzled tile whose column blocks are kBlockBytes apart.
template <typename T, int D, int kBlockBytes>
__device__ __forceinline__ void stage_acc(uint32_t tile_addr, const float (&acc)[D / 2],
                                          const float (&mul)[2], int warp, int lane) {
  const int quad = lane % 4, grow = lane / 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * warp + grow + 8 * r;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t addr = tile_addr + (n / 8) * kBlockBytes + row * kRowBytes +
                            (((n % 8) ^ (row % 8)) << 4) + 4 * quad;
      st_shared_b32(addr, pack2<T>(acc[4 * n + 2 * r] * mul[r], acc[4 * n + 2 * r + 1] * mul[r]));
    }
  }
}

// Writes rows [row0, row0 + 64) of the swizzled tile at `tile_addr` (column blocks kBlockBytes
// apart) to global rows base + token offset (tile origin o, log2 extents l): rows inside the
// sample's group (x < glen) from the tile, rows in [glen, span) as zeros (a ragged batch's
// padding), rows outside the tensor's group (x >= span) skipped; t: thread in the warpgroup.
template <typename T, int D, int kBlockBytes>
__device__ __forceinline__ void store_tile(T* base, uint32_t tile_addr, const int64_t* tok_stride,
                                           const FastDiv* dil, const int* o, const int* glen,
                                           const int* span, const int* l, int row0, int t) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < (64 * kChunks) / kWGThreads; ++i) {
    const int idx = t + i * kWGThreads;
    const int row = row0 + idx / kChunks, chunk = idx % kChunks;
    int cc[3];
    tile_coord(row, l, cc);
    bool valid = true, inside = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = o[a] + cc[a];
      valid = valid && x < span[a];
      inside = inside && x < glen[a];
      off += static_cast<int64_t>(x) * dil[a] * tok_stride[a];
    }
    if (valid) {
      const uint32_t addr = tile_addr + (chunk / 8) * kBlockBytes + row * kRowBytes +
                            (((chunk % 8) ^ (row % 8)) << 4);
      *reinterpret_cast<uint4*>(base + off + chunk * 8) =
          inside ? ld_shared_v4(addr) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Calls body(stage, phase, o) for each KV box of query tile c in the order producer and
// consumers share (row-major, last axis fastest): the ring stage (of kStages) the box occupies,
// the stage's mbarrier phase, and the box origin.
template <int kStages, typename Body>
__device__ __forceinline__ void for_each_box(const QTileWork& c, Body&& body) {
  int bi[3] = {0, 0, 0};
  int stage = 0;
  uint32_t phase = 0;
#pragma unroll 1
  for (int j = 0; j < c.total; ++j) {
    int o[3];
    c.box_origin(bi, o);
    body(stage, phase, o);
    NJ_NEXT_STAGE(stage, phase, kStages)
    NJ_NEXT_BOX(bi, c.nbox)
  }
}

// Producer warpgroup (thread pt): K and V of every KV box of query tile c's union, in the
// consumers' order (row-major, last axis fastest), into a ring of kStages stages (stage s at
// stage0 + s * kStageBytes: K, then V kVOffset bytes further). Before refilling a stage it waits
// for the stage's `empty` mbarrier; after issuing a box, one `full` arrival per thread (tracked
// cp.async). A box inside the union on every axis needs no predicates. kRowThreads: see
// TileLoader; kBoxKeys: keys per box (64, or 128 in the forward).
template <typename T, int D, int kStages, int kStageBytes, int kVOffset, int kRowThreads = 8,
          int kBoxKeys = 64>
__device__ __forceinline__ void produce_kv_boxes(const FnaFwdParams& p, const QTileWork& c,
                                                 int pt, uint32_t stage0, uint32_t bar_full,
                                                 uint32_t bar_empty) {
  using Loader = TileLoader<T, D, kBoxKeys, kRowThreads>;
  const Loader ld(pt);
  int64_t goff, st[3];
  group_layout(c.nb.g, c.nb.dil, p.kv_token_stride, goff, st);
  const int64_t kvoff = c.b * p.kv_batch_stride + goff + c.hkv * p.kv_head_stride + ld.chunk * 8;
  const T* kb = static_cast<const T*>(p.k) + kvoff;
  const T* vb = static_cast<const T*>(p.v) + kvoff;
  int64_t off[Loader::kPasses];
  ld.row_offsets(c.kl, st, off);
  for_each_box<kStages>(c, [&](int stage, uint32_t phase, const int (&o)[3]) {
    int64_t box_off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) box_off += o[a] * st[a];
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t ks = stage0 + stage * kStageBytes;
    const uint32_t dst[2] = {ks, ks + kVOffset};
    const T* const src[2] = {kb + box_off, vb + box_off};
    ld.load(dst, src, off, tile_inside(o, c.kl, c.hi), o, c.hi, c.kl);
    cp_async_arrive_noinc(bar_full + 8 * stage);
  });
  cp_async_wait_all();
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
