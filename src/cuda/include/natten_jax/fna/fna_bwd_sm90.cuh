// Fused neighborhood attention backward, Hopper path (sm_90a, wgmma): the two deterministic
// kernels of fna_bwd_sm80.cuh (same FnaBwdParams, tiles, outputs and conventions), with warpgroup
// MMAs, a producer warpgroup (predicated cp.async into 128-byte-swizzled stages, mbarriers) and
// setmaxnreg. Both recompute P = exp(scale Q K^T - lse) from the forward's logsumexp; delta =
// rowsum(dO * O) - d(lse) comes from the caller. No atomics: every output element is written by
// one thread, after a fixed-order accumulation.
//
// * dQ kernel (query-stationary): CTA = producer warpgroup + one consumer warpgroup owning a
//   64-query tile of one (batch, head, dilation group); two CTAs per SM. The producer loads Q and
//   dO once, then K and V of every KV box (64 keys) covering the union of the tile's windows.
//   Per box: S = Q K^T and dP = dO V^T (wgmma m64n64k16, all operands K-major in shared memory),
//   P and dS = P (dP - delta) in registers (masked where the box is not inside every window of
//   the warp's rows), dQ += dS K (wgmma m64nDk16, dS from registers, K as the MN-major B).
//   dQ = scale * acc, rows past the extent not written.
// * dK/dV kernel (key-stationary): CTA = producer warpgroup + two consumer warpgroups, one
//   64-key tile of one (batch, key/value head, dilation group), one CTA per SM. The producer
//   loads K and V once, then for each query head of the GQA group and each Q box (64 queries)
//   covering the tile's inverse neighborhood: Q, dO, and the rows' lse and delta (4-byte
//   cp.async). Consumer warpgroup w takes the boxes t = w, w + 2, ... (the stage count is even,
//   so stage s always belongs to warpgroup s % 2). Per box: S^T = K Q^T and dP^T = V dO^T
//   (m64n64k16, K-major), P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q (m64nDk16,
//   A from registers, dO / Q as MN-major B). The mask uses, per key row and axis, the interval of
//   queries whose windows contain the key (monotone window bounds: found once by binary search).
//   At the end the two warpgroups' partial sums are added through shared memory in a fixed
//   order (warpgroup 0 finishes dK, warpgroup 1 dV); dK = scale * acc.
//
// Head dims 64 and 128, fp16 / bf16. Built into every architecture's pass; the bodies hold code
// only in the sm_90a pass (elsewhere they trap; the host refuses other devices).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/group_info.cuh"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/tile_coord.cuh"
#include "natten_jax/window.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {
namespace bwd {

constexpr int kTile = 64;       // queries per Q tile / box, keys per KV box / tile
constexpr int kWG = 128;        // threads per warpgroup
constexpr int kRowBytes = 128;  // one row of a 64-element column block
constexpr int kBlockBytes = kTile * kRowBytes;  // one 64-row column block (8 KB)
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct DqConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kThreads = 2 * kWG;
  static constexpr int kMinBlocks = 2;
  static constexpr int kTileBytes = kTile * D * 2;
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr int kQOff = 0;
  static constexpr int kDoOff = kTileBytes;
  static constexpr int kStageOff = 2 * kTileBytes;      // stage s: K, then V
  static constexpr int kStageBytes = 2 * kTileBytes;
  // Per consumer thread, its key rows' query intervals (qlo, qhi: 2 rows x 3 axes x 2 ints),
  // as [12][2 * kWG] ints (read only on boxes that need a mask; kept out of registers).
  static constexpr int kIvOff = kStageOff + kStages * kStageBytes;
  static constexpr int kBarOff = kIvOff + 12 * 2 * kWG * 4;
  static constexpr int kSmemBytes = kBarOff + (2 * kStages + 1) * 8;
  static constexpr int kProducerRegs = 64;
  static constexpr int kConsumerRegs = 192;
  static_assert(kProducerRegs * kWG + kConsumerRegs * kWG <=
                    (65536 / kMinBlocks / kThreads) / 8 * 8 * kThreads,
                "register reallocation exceeds the launch budget");
  static_assert(kMinBlocks * (kSmemBytes + 1024) <= 233472, "shared memory per SM");
};

template <int D>
struct DkvConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kThreads = 3 * kWG;
  static constexpr int kMinBlocks = 1;
  static constexpr int kTileBytes = kTile * D * 2;
  static constexpr int kStages = D == 128 ? 4 : 6;  // even: stage s belongs to consumer s % 2
  static constexpr int kKOff = 0;
  static constexpr int kVOff = kTileBytes;
  static constexpr int kStageOff = 2 * kTileBytes;
  // Stage: Q tile, dO tile, then (at kMetaOff from the stage start) lse[64] and delta[64] (fp32;
  // padded to keep the tiles 1 KB aligned).
  static constexpr int kMetaOff = 2 * kTileBytes;
  static constexpr int kStageBytes = 2 * kTileBytes + 1024;
  // Per consumer thread, its key rows' query intervals (qlo, qhi: 2 rows x 3 axes x 2 ints),
  // as [12][2 * kWG] ints (read only on boxes that need a mask; kept out of registers).
  static constexpr int kIvOff = kStageOff + kStages * kStageBytes;
  static constexpr int kBarOff = kIvOff + 12 * 2 * kWG * 4;
  static constexpr int kSmemBytes = kBarOff + (2 * kStages + 1) * 8;
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = 224;
  static_assert(kProducerRegs * kWG + 2 * kConsumerRegs * kWG <=
                    (65536 / kMinBlocks / kThreads) / 8 * 8 * kThreads,
                "register reallocation exceeds the launch budget");
  static_assert(kSmemBytes + 1024 <= 233472, "shared memory per SM");
  // The final reduction: one fp32 accumulator per consumer warpgroup in the stage region.
  static_assert(2 * kWG * (D / 2) * 4 <= kStages * kStageBytes, "reduction buffer");
};

// Bits [0, n) set, n in [0, 64].
__device__ __forceinline__ uint64_t bits_below(int n) {
  return n >= 64 ? ~0ull : ((1ull << n) - 1ull);
}

// Smallest i in [lo, hi) with pred(i) (pred false then true), hi if none.
template <typename Pred>
__device__ __forceinline__ int lower_bound(int lo, int hi, Pred pred) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pred(mid))
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// Token masks of a 64-token box of 2^l[0] x 2^l[1] x 2^l[2] tokens (row-major: index c0 << sh0 |
// c1 << sh1 | c2): the tokens whose coordinate on axis a lies in [lo, hi) (box-local) are bits
// [lo << sh[a], hi << sh[a]) of every period of 2^(l[a] + sh[a]) bits, i.e. that interval times
// rep[a] (ones at the period starts).
struct BoxMask {
  int sh[3], ext[3];
  uint64_t rep[3];

  __device__ __forceinline__ explicit BoxMask(const int* l) {
    sh[2] = 0;
    sh[1] = l[2];
    sh[0] = l[1] + l[2];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ext[a] = 1 << l[a];
      rep[a] = 1ull;
      for (int period = 1 << (l[a] + sh[a]); period < 64; period <<= 1) rep[a] |= rep[a] << period;
    }
  }
  // Tokens of the box at `org` whose coordinate lies in [lo[a], hi[a]) on every axis a with
  // !full[a] (axes with full[a] are not tested).
  __device__ __forceinline__ uint64_t mask(const int (&lo)[3], const int (&hi)[3],
                                           const int (&org)[3], const bool (&full)[3]) const {
    uint64_t m = ~0ull;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      if (full[a]) continue;
      const int klo = min(max(lo[a] - org[a], 0), ext[a]);
      const int khi = max(min(hi[a] - org[a], ext[a]), 0);
      const uint64_t iv = bits_below(khi << sh[a]) & ~bits_below(klo << sh[a]);
      m &= a == 0 ? iv : iv * rep[a];
    }
    return m;
  }
};

// Whether column 8n + 2 quad + e of the accumulator fragment is set in `m` (already shifted
// right by 2 quad).
__device__ __forceinline__ bool mask_bit(uint64_t m, int n, int e) {
  const uint32_t word = n < 4 ? static_cast<uint32_t>(m) : static_cast<uint32_t>(m >> 32);
  return (word >> (8 * (n % 4) + e)) & 1u;
}

// Producer-side loader of 64-row tiles (D elements per row) into the swizzled wgmma layout:
// thread pt moves 16-byte chunk `chunk` (0..7) of every 64-element column block of rows
// rsub + i * kRowsPerPass (16 rows per pass, 4 passes: few row offsets to keep per thread).
template <typename T, int D>
struct TileLoader {
  static constexpr int kBlocks = D / 64;
  static constexpr int kRowsPerPass = kWG / 8;  // 16 (a multiple of the 8-row swizzle atom)
  static constexpr int kPasses = kTile / kRowsPerPass;
  int chunk, rsub;
  uint32_t col;  // byte offset of this thread's chunk within a row of column block 0 (swizzled)

  __device__ __forceinline__ explicit TileLoader(int pt) : chunk(pt % 8), rsub(pt / 8) {
    col = static_cast<uint32_t>((chunk ^ (rsub & 7)) << 4);
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
  // Rows of two tensors sharing a layout (src0 / src1: the tile origin's row, chunk included)
  // into the tiles at shared addresses dst0 / dst1; a row whose coordinate o + c reaches `lim`
  // on some axis is zero-filled (only tested when !interior).
  __device__ __forceinline__ void load2(uint32_t dst0, uint32_t dst1, const T* src0,
                                        const T* src1, const int64_t (&off)[kPasses],
                                        bool interior, const int* o, const int* lim,
                                        const int* l) const {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = rsub + i * kRowsPerPass;
      bool valid = true;
      if (!interior) {
        int cc[3];
        tile_coord(r, l, cc);
        valid = o[0] + cc[0] < lim[0] && o[1] + cc[1] < lim[1] && o[2] + cc[2] < lim[2];
      }
      const int64_t e = valid ? off[i] : 0;
#pragma unroll
      for (int bk = 0; bk < kBlocks; ++bk) {
        const uint32_t d = col + bk * kBlockBytes + r * kRowBytes;
        cp_async16(dst0 + d, src0 + e + 64 * bk, valid);
        cp_async16(dst1 + d, src1 + e + 64 * bk, valid);
      }
    }
  }
};

// D / 16 k16 steps of an SS product (64 x 64, fp32) = A (64 rows at a_addr) x B^T (64 rows at
// b_addr), both K-major 64-row tiles of D columns.
template <typename T, int D>
__device__ __forceinline__ void issue_ss(float (&acc)[32], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t off = (kk / 4) * kBlockBytes + (kk % 4) * 32;
    Gmma<T>::ss_n64(acc, gmma_desc(a_addr + off, 16, 1024), gmma_desc(b_addr + off, 16, 1024),
                    kk > 0 ? 1 : 0);
  }
}

// acc (64 x D) += A (64 x 64, registers, 4 k16 fragments) x B (64 rows at b_addr, MN-major:
// the rows are the k dimension, the D columns the n dimension).
template <typename T, int D>
__device__ __forceinline__ void issue_rs(float (&acc)[D / 2], const uint32_t (&a)[4][4],
                                         uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t db = gmma_desc(b_addr + kk * 16 * kRowBytes, kBlockBytes, 1024);
    if constexpr (D == 128) {
      Gmma<T>::rs_n128(acc, a[kk], db);
    } else {
      Gmma<T>::rs_n64(acc, a[kk], db);
    }
  }
}

// A-operand fragments (4 k16 steps) from a 64 x 64 fp32 accumulator fragment.
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4][4], const float (&x)[32]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack2<T>(x[8 * kk + 0], x[8 * kk + 1]);
    a[kk][1] = pack2<T>(x[8 * kk + 2], x[8 * kk + 3]);
    a[kk][2] = pack2<T>(x[8 * kk + 4], x[8 * kk + 5]);
    a[kk][3] = pack2<T>(x[8 * kk + 6], x[8 * kk + 7]);
  }
}

// Stores a 64 x D accumulator fragment (rows 16 warp + grow (+8) of a 64-row tile, times `mul`)
// as T into the swizzled tile at `tile_addr`.
template <typename T, int D>
__device__ __forceinline__ void stage_acc(uint32_t tile_addr, const float (&acc)[D / 2],
                                          float mul, int warp, int lane) {
  const int quad = lane % 4, grow = lane / 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * warp + grow + 8 * r;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t addr = tile_addr + (n / 8) * kBlockBytes + row * kRowBytes +
                            (((n % 8) ^ (row % 8)) << 4) + 4 * quad;
      st_shared_b32(addr, pack2<T>(acc[4 * n + 2 * r] * mul, acc[4 * n + 2 * r + 1] * mul));
    }
  }
}

// Writes the 64-row swizzled tile at `tile_addr` to global rows base + token offset (tile
// origin o, log2 extents l), skipping rows outside the group (x >= glen); t: thread in the
// warpgroup.
template <typename T, int D>
__device__ __forceinline__ void store_tile(T* base, uint32_t tile_addr, const int64_t* tok_stride,
                                           const int* dil, const int* o, const int* glen,
                                           const int* l, int t) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < (kTile * kChunks) / kWG; ++i) {
    const int idx = t + i * kWG;
    const int row = idx / kChunks, chunk = idx % kChunks;
    int cc[3];
    tile_coord(row, l, cc);
    bool valid = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = o[a] + cc[a];
      valid = valid && x < glen[a];
      off += static_cast<int64_t>(x) * dil[a] * tok_stride[a];
    }
    if (valid) {
      const uint32_t addr = tile_addr + (chunk / 8) * kBlockBytes + row * kRowBytes +
                            (((chunk % 8) ^ (row % 8)) << 4);
      *reinterpret_cast<uint4*>(base + off + chunk * 8) = ld_shared_v4(addr);
    }
  }
}

// =============================================================================================
// dQ kernel.

struct DqWork {
  int b, h, hkv;
  int q0[3];
  int lo[3], hi[3], nbox[3];  // union of the tile's windows and KV boxes per axis
  int total;
  int ql[3], kl[3];
};

template <typename T, int D>
__device__ __forceinline__ void dq_produce(const FnaBwdParams& bp, const GroupInfo& gi,
                                           const DqWork& c, uint32_t sbase, int pt) {
  using Cfg = DqConfig<D>;
  using Ld = TileLoader<T, D>;
  const FnaFwdParams& p = bp.f;
  const Ld ld(pt);
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  int64_t goff_q = 0, goff_kv = 0, qst[3], kvst[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(gi.g[a]) * p.kv_token_stride[a];
    qst[a] = static_cast<int64_t>(gi.dil[a]) * p.q_token_stride[a];
    kvst[a] = static_cast<int64_t>(gi.dil[a]) * p.kv_token_stride[a];
  }
  const int64_t qoff = c.b * p.q_batch_stride + goff_q + c.h * p.q_head_stride + ld.chunk * 8;
  const int64_t kvoff =
      c.b * p.kv_batch_stride + goff_kv + c.hkv * p.kv_head_stride + ld.chunk * 8;
  const T* kb = static_cast<const T*>(p.k) + kvoff;
  const T* vb = static_cast<const T*>(p.v) + kvoff;

  int64_t off[Ld::kPasses];
  {
    ld.row_offsets(c.ql, qst, off);
    int64_t org = 0;
    bool interior = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      org += c.q0[a] * qst[a];
      interior = interior && c.q0[a] + (1 << c.ql[a]) <= gi.glen[a];
    }
    ld.load2(sbase + Cfg::kQOff, sbase + Cfg::kDoOff, static_cast<const T*>(p.q) + qoff + org,
             static_cast<const T*>(bp.dout) + qoff + org, off, interior, c.q0, gi.glen, c.ql);
    cp_async_arrive_noinc(bar_q);
  }

  ld.row_offsets(c.kl, kvst, off);
  int bi[3] = {0, 0, 0};
  int stage = 0;
  uint32_t phase = 0;
#pragma unroll 1
  for (int j = 0; j < c.total; ++j) {
    int o[3];
    int64_t box_off = 0;
    bool interior = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      o[a] = c.lo[a] + (bi[a] << c.kl[a]);
      box_off += o[a] * kvst[a];
      interior = interior && o[a] + (1 << c.kl[a]) <= c.hi[a];
    }
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t ks = sbase + Cfg::kStageOff + stage * Cfg::kStageBytes;
    ld.load2(ks, ks + Cfg::kTileBytes, kb + box_off, vb + box_off, off, interior, o, c.hi, c.kl);
    cp_async_arrive_noinc(bar_full + 8 * stage);
    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
    NJ_NEXT_BOX(bi, c.nbox)
  }
  cp_async_wait_all();
}

template <typename T, int D>
__device__ __forceinline__ void dq_consume(const FnaBwdParams& bp, const GroupInfo& gi,
                                           const DqWork& c, uint32_t sbase, int t) {
  using Cfg = DqConfig<D>;
  const FnaFwdParams& p = bp.f;
  const int warp = t / 32, lane = t % 32, quad = lane % 4, grow = lane / 4;
  const int row_base = 16 * warp;
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  // Intersection of the warp's windows (boxes inside it on an axis need no mask there): rows
  // form a sub-box of the tile and window bounds are monotone, so the first and last rows bound
  // it. Rows past the extent take the window of the last valid row (computed, never stored).
  int ilo[3], ihi[3];
  {
    int wf[3], wl[3];
    tile_coord(row_base, c.ql, wf);
    tile_coord(row_base + 15, c.ql, wl);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int first = min(c.q0[a] + wf[a], gi.glen[a] - 1);
      const int last = min(c.q0[a] + wl[a], gi.glen[a] - 1);
      ilo[a] = gi.start(a, last);
      ihi[a] = gi.end(a, first);
    }
  }
  // This thread's rows (row_base + grow, + 8): window [rlo, rhi) per axis, lse (base 2), delta.
  int rlo[2][3], rhi[2][3];
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int cc[3];
    tile_coord(row_base + grow + 8 * r, c.ql, cc);
    bool valid = true;
    int64_t off = c.b * p.lse_batch_stride + c.h;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int xr = c.q0[a] + cc[a];
      valid = valid && xr < gi.glen[a];
      const int x = min(xr, gi.glen[a] - 1);
      rlo[r][a] = gi.start(a, x);
      rhi[r][a] = gi.end(a, x);
      off += static_cast<int64_t>(gi.g[a] + x * gi.dil[a]) * p.lse_token_stride[a];
    }
    lse2[r] = valid ? p.lse[off] * kLog2e : 0.f;
    dlt[r] = valid ? bp.delta[off] : 0.f;
  }
  const BoxMask bm(c.kl);
  const float scale_log2 = p.scale_log2;

  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;

  mbar_wait(bar_q, 0);

  int bi[3] = {0, 0, 0};
  int stage = 0;
  uint32_t phase = 0;
#pragma unroll 1
  for (int j = 0; j < c.total; ++j) {
    int o[3];
    bool full[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      o[a] = c.lo[a] + (bi[a] << c.kl[a]);
      full[a] = o[a] >= ilo[a] && o[a] + bm.ext[a] <= ihi[a];
    }
    const bool all_full = full[0] && full[1] && full[2];
    mbar_wait(bar_full + 8 * stage, phase);
    fence_proxy_async();
    const uint32_t k_addr = sbase + Cfg::kStageOff + stage * Cfg::kStageBytes;
    const uint32_t v_addr = k_addr + Cfg::kTileBytes;

    // S = Q K^T, dP = dO V^T (two groups: P is computed while dP is still running).
    float s[32], dp[32];
    wgmma_fence();
    issue_ss<T, D>(s, sbase + Cfg::kQOff, k_addr);
    wgmma_commit();
    issue_ss<T, D>(dp, sbase + Cfg::kDoOff, v_addr);
    wgmma_commit();
    wgmma_wait<1>();
    reg_fence(s);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint64_t m = ~0ull;
      if (!all_full) m = bm.mask(rlo[r], rhi[r], o, full) >> (2 * quad);
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = fast_exp2(fmaf(s[4 * n + 2 * r + e], scale_log2, -lse2[r]));
          s[4 * n + 2 * r + e] = mask_bit(m, n, e) ? pv : 0.f;
        }
    }
    wgmma_wait<0>();
    reg_fence(dp);
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * n + 2 * r + e;
          dp[i] = s[i] * (dp[i] - dlt[r]);
        }
    // dQ += dS K.
    uint32_t a[4][4];
    pack_a<T>(a, dp);
    reg_fence(dq);
    reg_fence(a);
    wgmma_fence();
    issue_rs<T, D>(dq, a, k_addr);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(dq);
    reg_fence(a);
    mbar_arrive_if(bar_empty + 8 * stage, lane == 0);

    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
    NJ_NEXT_BOX(bi, c.nbox)
  }

  // Epilogue: dQ = scale * acc through the (now unused) Q tile, 16-byte stores of valid rows.
  named_barrier_sync(1, kWG);
  stage_acc<T, D>(sbase + Cfg::kQOff, dq, scale_log2 / kLog2e, warp, lane);
  named_barrier_sync(1, kWG);
  int64_t goff_q = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
  store_tile<T, D>(static_cast<T*>(bp.dq) + c.b * p.q_batch_stride + goff_q + c.h * p.q_head_stride,
                   sbase + Cfg::kQOff, p.q_token_stride, gi.dil, c.q0, gi.glen, c.ql, t);
}

template <typename T, int D>
__global__ void __launch_bounds__(DqConfig<D>::kThreads, DqConfig<D>::kMinBlocks)
    fna_bwd_dq_sm90_kernel(const __grid_constant__ FnaBwdParams bp) {
#if NJ_SM90A
  using Cfg = DqConfig<D>;
  const FnaFwdParams& p = bp.f;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sbase = smem_u32(smem);
  if (sbase & 1023u) __trap();

  DqWork c;
  c.b = blockIdx.z;
  c.h = blockIdx.y % p.heads;
  c.hkv = c.h / (p.heads / p.heads_kv);
  const GroupInfo gi(p, blockIdx.y / p.heads);
  {
    int tq = blockIdx.x;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      const int i = tq % p.num_q_tiles[a];
      tq /= p.num_q_tiles[a];
      c.q0[a] = i << p.q_tile_log2[a];
    }
  }
  c.total = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    c.ql[a] = p.q_tile_log2[a];
    c.kl[a] = p.kv_tile_log2[a];
    if (c.q0[a] >= gi.glen[a]) return;  // this group is shorter than group 0 on this axis
    const int qlast = min(c.q0[a] + (1 << c.ql[a]), gi.glen[a]) - 1;
    c.lo[a] = gi.start(a, c.q0[a]);
    c.hi[a] = gi.end(a, qlast);
    const int box = 1 << c.kl[a];
    c.nbox[a] = (c.hi[a] - c.lo[a] + box - 1) / box;
    c.total *= c.nbox[a];
  }

  const uint32_t bar_full = sbase + Cfg::kBarOff;
  if (threadIdx.x == 0) {
#pragma unroll 1
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(bar_full + 8 * s, kWG);                  // full: producer threads
      mbar_init(bar_full + 8 * (Cfg::kStages + s), 4);   // empty: consumer warps
    }
    mbar_init(bar_full + 16 * Cfg::kStages, kWG);        // Q and dO loaded
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kWG, 0);
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    dq_produce<T, D>(bp, gi, c, sbase, threadIdx.x);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    dq_consume<T, D>(bp, gi, c, sbase, threadIdx.x - kWG);
  }
#else
  (void)bp;
  __trap();  // built for another architecture: the host launcher never starts this
#endif
}

// =============================================================================================
// dK / dV kernel.

struct DkvWork {
  int b, hkv, group_heads;
  int k0[3];
  int ilo[3], ihi[3], nq[3];  // inverse neighborhood [ilo, ihi) and Q boxes per axis
  int boxes, total;           // Q boxes per head, boxes x group heads
  int ql[3], kl[3];
};

// Head and box origin of work item t (head-major, then boxes with the last axis fastest).
__device__ __forceinline__ int dkv_item(const DkvWork& c, int t, int (&o)[3]) {
  const int hh = t / c.boxes;
  int j = t - hh * c.boxes;
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    const int q = j / c.nq[a];
    o[a] = c.ilo[a] + ((j - q * c.nq[a]) << c.ql[a]);
    j = q;
  }
  return c.hkv * c.group_heads + hh;
}

// Block index through volatile reads: the compiler cannot merge them with earlier reads (used
// to recompute values after the main loop instead of holding them in registers through it).
__device__ __forceinline__ int ctaid_x() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(v));
  return v;
}
__device__ __forceinline__ int ctaid_y() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(v));
  return v;
}
__device__ __forceinline__ int ctaid_z() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(v));
  return v;
}

// The key tile of a dK/dV CTA (block (x, y, z)): batch, key/value head, dilation group and the
// tile origin (in-group coordinates).
struct DkvTile {
  int b, hkv;
  GroupInfo gi;
  int k0[3];
};
__device__ __forceinline__ DkvTile dkv_tile(const FnaBwdParams& bp, int x, int y, int z) {
  const FnaFwdParams& p = bp.f;
  DkvTile e{z, y % p.heads_kv, GroupInfo(p, y / p.heads_kv), {0, 0, 0}};
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    const int i = x % bp.num_kv_tiles[a];
    x /= bp.num_kv_tiles[a];
    e.k0[a] = i << p.kv_tile_log2[a];
  }
  return e;
}

template <typename T, int D>
__device__ __forceinline__ void dkv_produce(const FnaBwdParams& bp, const GroupInfo& gi,
                                            const DkvWork& c, uint32_t sbase, int pt) {
  using Cfg = DkvConfig<D>;
  using Ld = TileLoader<T, D>;
  const FnaFwdParams& p = bp.f;
  const Ld ld(pt);
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_kv = bar_full + 16 * Cfg::kStages;

  int64_t goff_q = 0, goff_kv = 0, qst[3], kvst[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(gi.g[a]) * p.kv_token_stride[a];
    qst[a] = static_cast<int64_t>(gi.dil[a]) * p.q_token_stride[a];
    kvst[a] = static_cast<int64_t>(gi.dil[a]) * p.kv_token_stride[a];
  }
  int64_t off[Ld::kPasses];
  {
    ld.row_offsets(c.kl, kvst, off);
    int64_t org = c.b * p.kv_batch_stride + goff_kv + c.hkv * p.kv_head_stride + ld.chunk * 8;
    bool interior = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      org += c.k0[a] * kvst[a];
      interior = interior && c.k0[a] + (1 << c.kl[a]) <= gi.glen[a];
    }
    ld.load2(sbase + Cfg::kKOff, sbase + Cfg::kVOff, static_cast<const T*>(p.k) + org,
             static_cast<const T*>(p.v) + org, off, interior, c.k0, gi.glen, c.kl);
    cp_async_arrive_noinc(bar_kv);
  }

  ld.row_offsets(c.ql, qst, off);
  const T* qb = static_cast<const T*>(p.q) + c.b * p.q_batch_stride + goff_q + ld.chunk * 8;
  const T* db = static_cast<const T*>(bp.dout) + c.b * p.q_batch_stride + goff_q + ld.chunk * 8;
  // Per-row scalars: thread pt loads lse (pt < 64) or delta (pt >= 64) of row pt % 64. (Few
  // values stay live across the loop: the producer runs with kProducerRegs registers.)
  const int srow = pt % kTile;
  const float* sptr;
  {
    int scc[3];
    tile_coord(srow, c.ql, scc);
    int64_t soff = c.b * p.lse_batch_stride;
#pragma unroll
    for (int a = 0; a < 3; ++a)
      soff += static_cast<int64_t>(gi.g[a] + scc[a] * gi.dil[a]) * p.lse_token_stride[a];
    sptr = (pt < kTile ? p.lse : bp.delta) + soff;
  }
  const uint32_t sdst = Cfg::kMetaOff + (pt / kTile) * 256 + srow * 4;

  int stage = 0;
  uint32_t phase = 0;
#pragma unroll 1
  for (int t = 0; t < c.total; ++t) {
    int o[3], scc[3];
    const int h = dkv_item(c, t, o);
    tile_coord(srow, c.ql, scc);
    int64_t box_off = h * p.q_head_stride, lse_off = h;
    bool interior = true, svalid = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      box_off += o[a] * (static_cast<int64_t>(p.dilation[a]) * p.q_token_stride[a]);
      lse_off += static_cast<int64_t>(o[a]) * p.dilation[a] * p.lse_token_stride[a];
      interior = interior && o[a] + (1 << c.ql[a]) <= gi.glen[a];
      svalid = svalid && o[a] + scc[a] < gi.glen[a];
    }
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t st_addr = sbase + Cfg::kStageOff + stage * Cfg::kStageBytes;
    ld.load2(st_addr, st_addr + Cfg::kTileBytes, qb + box_off, db + box_off, off,
             interior, o, gi.glen, c.ql);
    cp_async4(st_addr + sdst, svalid ? sptr + lse_off : sptr, svalid);
    cp_async_arrive_noinc(bar_full + 8 * stage);
    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
  }
  cp_async_wait_all();
}

template <typename T, int D>
__device__ __forceinline__ void dkv_consume(const FnaBwdParams& bp, const GroupInfo& gi,
                                            const DkvWork& c, unsigned char* smem,
                                            uint32_t sbase, int w, int t) {
  using Cfg = DkvConfig<D>;
  const FnaFwdParams& p = bp.f;
  const int warp = t / 32, lane = t % 32, quad = lane % 4, grow = lane / 4;
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_kv = bar_full + 16 * Cfg::kStages;

  // This thread's key rows (16 warp + grow, + 8; both warpgroups hold the same rows): per axis
  // the interval [qlo, qhi) of in-group queries whose windows contain the key (window bounds
  // are monotone in the query), stored in shared memory (this thread's own slots). Rows past the
  // extent take the last valid key (never stored). The warp's intersection [wlo, whi) marks the
  // boxes that need no mask on an axis.
  const uint32_t iv_addr = sbase + Cfg::kIvOff + (w * kWG + t) * 4;
  int wlo[3], whi[3];
  {
    int qlo[2][3], qhi[2][3];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int cc[3];
      tile_coord(16 * warp + grow + 8 * r, c.kl, cc);
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const int x = min(c.k0[a] + cc[a], gi.glen[a] - 1);
        qlo[r][a] = lower_bound(c.ilo[a], c.ihi[a], [&](int i) { return gi.end(a, i) > x; });
        qhi[r][a] = lower_bound(c.ilo[a], c.ihi[a], [&](int i) { return gi.start(a, i) > x; });
        st_shared_b32(iv_addr + (6 * r + 2 * a) * 2 * kWG * 4, static_cast<uint32_t>(qlo[r][a]));
        st_shared_b32(iv_addr + (6 * r + 2 * a + 1) * 2 * kWG * 4,
                      static_cast<uint32_t>(qhi[r][a]));
      }
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      wlo[a] = __reduce_max_sync(0xffffffffu, max(qlo[0][a], qlo[1][a]));
      whi[a] = __reduce_min_sync(0xffffffffu, min(qhi[0][a], qhi[1][a]));
    }
  }
  const float scale_log2 = p.scale_log2;

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

  mbar_wait(bar_kv, 0);

#pragma unroll 1
  for (int it = w; it < c.total; it += 2) {
    const int stage = it % Cfg::kStages;
    const uint32_t phase = static_cast<uint32_t>(it / Cfg::kStages) & 1u;
    int o[3];
    dkv_item(c, it, o);
    bool full[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) full[a] = o[a] >= wlo[a] && o[a] + (1 << c.ql[a]) <= whi[a];
    const bool all_full = full[0] && full[1] && full[2];
    mbar_wait(bar_full + 8 * stage, phase);
    fence_proxy_async();
    const uint32_t q_addr = sbase + Cfg::kStageOff + stage * Cfg::kStageBytes;
    const uint32_t do_addr = q_addr + Cfg::kTileBytes;
    const uint32_t meta = q_addr + Cfg::kMetaOff;  // this stage's lse[64], delta[64]

    // S^T = K Q^T, dP^T = V dO^T (keys x queries).
    float s[32], dp[32];
    wgmma_fence();
    issue_ss<T, D>(s, sbase + Cfg::kKOff, q_addr);
    wgmma_commit();
    issue_ss<T, D>(dp, sbase + Cfg::kVOff, do_addr);
    wgmma_commit();
    wgmma_wait<1>();
    reg_fence(s);
    // P^T: column (query) c = 8n + 2 quad + e has lse[c] (natural log) in the stage.
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float2 lv = ld_shared_v2f(meta + (8 * n + 2 * quad) * 4);
      const float l2[2] = {lv.x * kLog2e, lv.y * kLog2e};
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          s[4 * n + 2 * r + e] = fast_exp2(fmaf(s[4 * n + 2 * r + e], scale_log2, -l2[e]));
    }
    if (!all_full) {
      const BoxMask bm(c.ql);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        int qlo[3], qhi[3];
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          qlo[a] = static_cast<int>(ld_shared_u32(iv_addr + (6 * r + 2 * a) * 2 * kWG * 4));
          qhi[a] = static_cast<int>(ld_shared_u32(iv_addr + (6 * r + 2 * a + 1) * 2 * kWG * 4));
        }
        const uint64_t m = bm.mask(qlo, qhi, o, full) >> (2 * quad);
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (!mask_bit(m, n, e)) s[4 * n + 2 * r + e] = 0.f;
      }
    }
    wgmma_wait<0>();
    reg_fence(dp);
    // dS^T = P^T (dP^T - delta[c]).
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float2 dv2 = ld_shared_v2f(meta + 256 + (8 * n + 2 * quad) * 4);
      const float dl[2] = {dv2.x, dv2.y};
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * n + 2 * r + e;
          dp[i] = s[i] * (dp[i] - dl[e]);
        }
    }
    // dV += P^T dO, dK += dS^T Q.
    uint32_t pa[4][4], sa[4][4];
    pack_a<T>(pa, s);
    pack_a<T>(sa, dp);
    reg_fence(dv);
    reg_fence(dk);
    reg_fence(pa);
    reg_fence(sa);
    wgmma_fence();
    issue_rs<T, D>(dv, pa, do_addr);
    issue_rs<T, D>(dk, sa, q_addr);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(dv);
    reg_fence(dk);
    reg_fence(pa);
    reg_fence(sa);
    // Every thread frees the stage itself: its own lse / delta reads of the stage are then
    // ordered before the producer's next cp.async into it (one arrival per warp, after the warp
    // collective wgmma, orders them too, but racecheck flags the other lanes' reads).
    mbar_arrive_if(bar_empty + 8 * stage, true);
  }

  // ---- Epilogue. Both consumers are done with every stage and with K / V: warpgroup 0 hands
  // its dV to warpgroup 1 and finishes dK = scale (dK_0 + dK_1); warpgroup 1 the reverse.
  named_barrier_sync(1, 2 * kWG);
  float* xbuf = reinterpret_cast<float*>(smem + Cfg::kStageOff);  // [2][D/2][kWG]
  {
    float* mine = xbuf + w * (D / 2) * kWG;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) mine[i * kWG + t] = w == 0 ? dv[i] : dk[i];
  }
  named_barrier_sync(1, 2 * kWG);
  {
    const float* other = xbuf + (1 - w) * (D / 2) * kWG;
    if (w == 0) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dk[i] += other[i * kWG + t];
    } else {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dv[i] = other[i * kWG + t] + dv[i];
    }
  }
  const uint32_t out_tile = sbase + (w == 0 ? Cfg::kKOff : Cfg::kVOff);
  if (w == 0) {
    stage_acc<T, D>(out_tile, dk, scale_log2 / kLog2e, warp, lane);
  } else {
    stage_acc<T, D>(out_tile, dv, 1.f, warp, lane);
  }
  named_barrier_sync(2 + w, kWG);
  // The CTA's coordinates again, from the kernel parameters and fresh reads of the block
  // index (not kept in registers across the main loop).
  const DkvTile e = dkv_tile(bp, ctaid_x(), ctaid_y(), ctaid_z());
  int64_t goff_kv = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) goff_kv += static_cast<int64_t>(e.gi.g[a]) * p.kv_token_stride[a];
  T* out = static_cast<T*>(w == 0 ? bp.dk : bp.dv) + e.b * p.kv_batch_stride + goff_kv +
           e.hkv * p.kv_head_stride;
  store_tile<T, D>(out, out_tile, p.kv_token_stride, e.gi.dil, e.k0, e.gi.glen,
                   p.kv_tile_log2, t);
}

template <typename T, int D>
__global__ void __launch_bounds__(DkvConfig<D>::kThreads, DkvConfig<D>::kMinBlocks)
    fna_bwd_dkdv_sm90_kernel(const __grid_constant__ FnaBwdParams bp) {
#if NJ_SM90A
  using Cfg = DkvConfig<D>;
  const FnaFwdParams& p = bp.f;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sbase = smem_u32(smem);
  if (sbase & 1023u) __trap();

  DkvWork c;
  const DkvTile e = dkv_tile(bp, blockIdx.x, blockIdx.y, blockIdx.z);
  const GroupInfo& gi = e.gi;
  c.b = e.b;
  c.hkv = e.hkv;
  c.group_heads = p.heads / p.heads_kv;
#pragma unroll
  for (int a = 0; a < 3; ++a) c.k0[a] = e.k0[a];
  c.boxes = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    c.ql[a] = p.q_tile_log2[a];
    c.kl[a] = p.kv_tile_log2[a];
    if (c.k0[a] >= gi.glen[a]) return;
    const int k1 = min(c.k0[a] + (1 << c.kl[a]), gi.glen[a]);
    // Inverse neighborhood: queries i with end(i) > k0 and start(i) < k1 (both monotone).
    const int n = gi.glen[a];
    c.ilo[a] = lower_bound(0, n, [&](int i) { return gi.end(a, i) > c.k0[a]; });
    c.ihi[a] = lower_bound(0, n, [&](int i) { return gi.start(a, i) >= k1; });
    const int box = 1 << c.ql[a];
    c.nq[a] = c.ihi[a] > c.ilo[a] ? (c.ihi[a] - c.ilo[a] + box - 1) / box : 0;
    c.boxes *= c.nq[a];
  }
  c.total = c.boxes * c.group_heads;

  const uint32_t bar_full = sbase + Cfg::kBarOff;
  if (threadIdx.x == 0) {
#pragma unroll 1
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(bar_full + 8 * s, kWG);                 // full: producer threads
      mbar_init(bar_full + 8 * (Cfg::kStages + s), kWG);  // empty: the owning consumer's threads
    }
    mbar_init(bar_full + 16 * Cfg::kStages, kWG);       // K and V loaded
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kWG, 0);
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    dkv_produce<T, D>(bp, gi, c, sbase, threadIdx.x);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    dkv_consume<T, D>(bp, gi, c, smem, sbase, wg - 1, threadIdx.x - kWG * wg);
  }
#else
  (void)bp;
  __trap();
#endif
}

template <typename T, int D>
cudaError_t launch_backward(const FnaBwdParams& bp, cudaStream_t stream) {
  const FnaFwdParams& p = bp.f;
  const int groups = p.dilation[0] * p.dilation[1] * p.dilation[2];
  {
    using Cfg = DqConfig<D>;
    auto kernel = fna_bwd_dq_sm90_kernel<T, D>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    dim3 grid(p.num_q_tiles[0] * p.num_q_tiles[1] * p.num_q_tiles[2], p.heads * groups,
              p.batch);
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(bp);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  {
    using Cfg = DkvConfig<D>;
    auto kernel = fna_bwd_dkdv_sm90_kernel<T, D>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    dim3 grid(bp.num_kv_tiles[0] * bp.num_kv_tiles[1] * bp.num_kv_tiles[2],
              p.heads_kv * groups, p.batch);
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(bp);
    return cudaGetLastError();
  }
}

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
