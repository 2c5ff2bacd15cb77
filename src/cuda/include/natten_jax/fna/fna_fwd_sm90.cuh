// Fused neighborhood attention forward, Hopper path (sm_90a): warpgroup MMA (wgmma), a producer
// warpgroup that loads KV boxes with cp.async into a multi-stage mbarrier pipeline, and one or two
// consumer warpgroups of 64 query rows each.
//
// Same problem decomposition as the sm80 kernel (fna_fwd_sm80.cuh): one CTA computes one Q tile
// of 64 * NWG queries (a multi-dimensional box of 2^a x 2^b x 2^c tokens of one dilation group)
// for one (batch, head); it visits the union of its queries' windows as KV boxes of 64 keys (also
// multi-dimensional, starting at the union's corner). Outputs (O, and the natural-log LSE in
// fp32) follow the sm80 kernel's conventions exactly.
//
// Warpgroup roles (4 warps each):
//   * WG 0, producer: loads the Q tile, then box after box K and V into `kStages` stages with
//     predicated cp.async (zero fill outside the union / the group), into the 128-byte-swizzled
//     wgmma layout; each stage's completion is tracked by a `full` mbarrier (one
//     cp.async.mbarrier.arrive.noinc per producer thread). It waits for a stage's `empty`
//     mbarrier (one arrival per consumer warp) before refilling it.
//   * WG 1..NWG, consumers: WG w owns Q-tile rows [64(w-1), 64w). Per box it touches:
//     S = Q K^T (wgmma m64n64k16, Q and K from shared memory), the neighborhood mask where the
//     box is not inside every window of the warp's rows (a 64-bit key mask per row, built from
//     per-axis intervals), online softmax in fp32 registers, then O += P V (wgmma m64nDk16, P from
//     registers, V from shared memory as an MN-major operand). The P V product of box j is issued
//     together with S of the next touched box, so the softmax of one box overlaps the P V GEMM of
//     the previous one; the two consumer warpgroups also overlap each other. A box outside the
//     union of the warpgroup's windows is skipped (released without any MMA).
// O is staged through the warpgroup's part of the Q buffer for 16-byte global stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/tile_coord.cuh"
#include "natten_jax/window.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {

constexpr int kBoxKeys = 64;  // keys per KV box
constexpr int kWGThreads = 128;

template <int D, int NWG>
struct FwdConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static_assert(NWG == 1 || NWG == 2, "one or two consumer warpgroups");
  static constexpr int kThreads = kWGThreads * (NWG + 1);
  // One consumer warpgroup: two CTAs per SM (registers and shared memory sized for it).
  static constexpr int kMinBlocks = NWG == 1 ? 2 : 1;
  static constexpr int kQRows = 64 * NWG;
  static constexpr int kRowBytes = 128;               // one 64-element column block row
  static constexpr int kDBlocks = D / 64;             // column blocks per row
  static constexpr int kQBlockBytes = kQRows * kRowBytes;
  static constexpr int kBoxBlockBytes = kBoxKeys * kRowBytes;
  static constexpr int kQBytes = kQRows * D * 2;
  static constexpr int kBoxBytes = kBoxKeys * D * 2;  // K (or V) of one box
  static constexpr int kStages = NWG == 2 ? (D == 128 ? 4 : 6) : (D == 128 ? 3 : 6);
  static constexpr int kStageOffset = kQBytes;        // stage s: K, then V
  static constexpr int kBarOffset = kQBytes + kStages * 2 * kBoxBytes;
  static constexpr int kSmemBytes = kBarOffset + (2 * kStages + 1) * 8;
  static constexpr int kProducerRegs = 64;
  static constexpr int kConsumerRegs = NWG == 2 ? 216 : 192;
  // Registers at launch x threads must cover what the warpgroups hold after reallocation.
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * NWG <=
                    (65536 / kMinBlocks / kThreads) / 8 * 8 * kThreads,
                "register reallocation exceeds the launch budget");
  static_assert(kMinBlocks * (kSmemBytes + 1024) <= 233472, "shared memory per SM");
};

// Bits [0, n) set, n in [0, 64].
__device__ __forceinline__ uint64_t low_bits(int n) {
  return n >= 64 ? ~0ull : ((1ull << n) - 1ull);
}

// What both roles know about the CTA's work.
struct CtaWork {
  int b, h, hkv;
  int g[3], dil[3], glen[3], q0[3];
  int lo[3], hi[3], nbox[3];  // union of the tile's windows [lo, hi) and boxes per axis
  int total;                  // boxes
  int ql[3], kl[3];           // log2 tile extents (Q tile, KV box)
};

// ---- Producer warpgroup: Q tile, then every KV box of the union.
template <typename T, int D, int NWG>
__device__ __forceinline__ void fwd_produce(const FnaFwdParams& p, const CtaWork& c,
                                            uint32_t sbase, int pt) {
  using Cfg = FwdConfig<D, NWG>;
  constexpr int kChunks = D / 8;                      // 16-byte chunks per row
  constexpr int kRowsPerPass = kWGThreads / kChunks;  // 8 or 16: a multiple of 8
  const int chunk = pt % kChunks, rsub = pt / kChunks;
  // Swizzled byte offset of this thread's chunk within a row (row % 8 == rsub % 8 on every
  // pass), plus its column block.
  const uint32_t xcol = static_cast<uint32_t>((((chunk & 7) ^ (rsub & 7)) << 4));
  const uint32_t qcol = (chunk >> 3) * Cfg::kQBlockBytes + xcol;
  const uint32_t kvcol = (chunk >> 3) * Cfg::kBoxBlockBytes + xcol;
  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  int64_t goff_q = 0, goff_kv = 0, qst[3], kvst[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(c.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(c.g[a]) * p.kv_token_stride[a];
    qst[a] = static_cast<int64_t>(c.dil[a]) * p.q_token_stride[a];
    kvst[a] = static_cast<int64_t>(c.dil[a]) * p.kv_token_stride[a];
  }
  const T* qbase = static_cast<const T*>(p.q) + c.b * p.q_batch_stride + goff_q +
                   c.h * p.q_head_stride + chunk * 8;
  const T* kbase = static_cast<const T*>(p.k) + c.b * p.kv_batch_stride + goff_kv +
                   c.hkv * p.kv_head_stride + chunk * 8;
  const T* vbase = static_cast<const T*>(p.v) + c.b * p.kv_batch_stride + goff_kv +
                   c.hkv * p.kv_head_stride + chunk * 8;

  // Q tile (rows beyond the group's extent are zero).
#pragma unroll
  for (int i = 0; i < Cfg::kQRows / kRowsPerPass; ++i) {
    const int r = rsub + i * kRowsPerPass;
    int cc[3];
    tile_coord(r, c.ql, cc);
    bool valid = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = c.q0[a] + cc[a];
      valid = valid && x < c.glen[a];
      off += x * qst[a];
    }
    cp_async16(sbase + qcol + r * Cfg::kRowBytes, valid ? qbase + off : qbase, valid);
  }
  cp_async_arrive_noinc(bar_q);

  // KV boxes, in the consumers' order (last axis fastest). The part of a row's address that does
  // not depend on the box (its offset from the box origin) is computed once per pass; a box
  // inside the union on every axis (all but the last on each axis) needs no predicates.
  constexpr int kPasses = kBoxKeys / kRowsPerPass;
  // Byte addresses (as integers) of each pass's K row for a box at the origin; V rows are
  // `v_delta` bytes further (the same offsets in the other tensor).
  uint64_t row_addr[kPasses];
  const uint64_t k_addr0 = reinterpret_cast<uint64_t>(kbase);
  const uint64_t v_delta = reinterpret_cast<uint64_t>(vbase) - k_addr0;
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    int cc[3];
    tile_coord(rsub + i * kRowsPerPass, c.kl, cc);
    row_addr[i] = k_addr0 + static_cast<uint64_t>(
                                cc[0] * kvst[0] + cc[1] * kvst[1] + cc[2] * kvst[2]) *
                                sizeof(T);
  }
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
    const uint64_t box_bytes = static_cast<uint64_t>(box_off) * sizeof(T);
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t ks = sbase + Cfg::kStageOffset + stage * 2 * Cfg::kBoxBytes + kvcol;
    const uint32_t vs = ks + Cfg::kBoxBytes;
    if (interior) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = rsub + i * kRowsPerPass;
        const uint64_t ka = row_addr[i] + box_bytes;
        cp_async16(ks + r * Cfg::kRowBytes, reinterpret_cast<const void*>(ka), true);
        cp_async16(vs + r * Cfg::kRowBytes, reinterpret_cast<const void*>(ka + v_delta), true);
      }
    } else {  // rows past the union's end on some axis are zero-filled (nothing is read)
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = rsub + i * kRowsPerPass;
        int cc[3];
        tile_coord(r, c.kl, cc);
        const bool valid =
            o[0] + cc[0] < c.hi[0] && o[1] + cc[1] < c.hi[1] && o[2] + cc[2] < c.hi[2];
        const uint64_t ka = valid ? row_addr[i] + box_bytes : k_addr0;
        cp_async16(ks + r * Cfg::kRowBytes, reinterpret_cast<const void*>(ka), valid);
        cp_async16(vs + r * Cfg::kRowBytes, reinterpret_cast<const void*>(ka + v_delta), valid);
      }
    }
    cp_async_arrive_noinc(bar_full + 8 * stage);
    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
    NJ_NEXT_BOX(bi, c.nbox)
  }
  cp_async_wait_all();
}

// ---- Consumer warpgroup w (0-based): Q-tile rows [64w, 64w + 64).
template <typename T, int D, int NWG>
__device__ __forceinline__ void fwd_consume(const FnaFwdParams& p, const CtaWork& c,
                                            uint32_t sbase, int w, int t) {
  using Cfg = FwdConfig<D, NWG>;
  using Mma = Gmma<T>;
  constexpr int kOTiles = D / 8;  // 8-column tiles of the output accumulator
  const int warp = t / 32, lane = t % 32, quad = lane % 4, grow = lane / 4;
  const int row_base = 64 * w + 16 * warp;  // first Q-tile row of this warp
  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  int ks[3], st[3];
  bool causal[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    ks[a] = p.kernel[a];
    st[a] = p.stride[a];
    causal[a] = p.causal[a] != 0;
  }

  // Union of the warpgroup's windows (boxes outside are skipped), intersection of the warp's
  // windows (boxes inside need no mask). Rows form sub-boxes of the tile (power-of-two extents),
  // and window bounds are monotone, so the first and last rows bound both. Rows past the group's
  // extent take the window of the last valid row (they are computed, never stored).
  int ulo[3], uhi[3], ilo[3], ihi[3];
  bool active = true;
  {
    int cf[3], cl[3], wf[3], wl[3];
    tile_coord(64 * w, c.ql, cf);
    tile_coord(64 * w + 63, c.ql, cl);
    tile_coord(row_base, c.ql, wf);
    tile_coord(row_base + 15, c.ql, wl);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      int first = c.q0[a] + cf[a];
      const int last = min(c.q0[a] + cl[a], c.glen[a] - 1);
      active = active && first < c.glen[a];
      first = min(first, c.glen[a] - 1);
      const int sf = window_start(first, ks[a], st[a], c.glen[a], causal[a]);
      const int sl = window_start(last, ks[a], st[a], c.glen[a], causal[a]);
      ulo[a] = sf;
      uhi[a] = window_end(last, sl, ks[a], causal[a]);
      const int wfirst = min(c.q0[a] + wf[a], c.glen[a] - 1);
      const int wlast = min(c.q0[a] + wl[a], c.glen[a] - 1);
      const int swf = window_start(wfirst, ks[a], st[a], c.glen[a], causal[a]);
      ilo[a] = window_start(wlast, ks[a], st[a], c.glen[a], causal[a]);
      ihi[a] = window_end(wfirst, swf, ks[a], causal[a]);
    }
  }

  // This thread's two rows (row_base + grow and + 8): window start and length per axis.
  int rws[2][3], rlen[2][3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int cc[3];
    tile_coord(row_base + grow + 8 * r, c.ql, cc);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = min(c.q0[a] + cc[a], c.glen[a] - 1);
      const int ws = window_start(x, ks[a], st[a], c.glen[a], causal[a]);
      rws[r][a] = ws;
      rlen[r][a] = window_end(x, ws, ks[a], causal[a]) - ws;
    }
  }
  // Key index of box coordinates (c0, c1, c2) is c0 << sh[0] | c1 << sh[1] | c2; the keys whose
  // coordinate on axis a lies in [lo, hi) are bits [lo << sh[a], hi << sh[a]) of every period of
  // 2^(kl[a] + sh[a]) bits: that interval times rep[a] (ones at the period starts).
  int sh[3], ext[3];
  uint64_t rep[3];
  sh[2] = 0;
  sh[1] = c.kl[2];
  sh[0] = c.kl[1] + c.kl[2];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    ext[a] = 1 << c.kl[a];
    rep[a] = 1ull;
    for (int period = 1 << (c.kl[a] + sh[a]); period < 64; period <<= 1) rep[a] |= rep[a] << period;
  }

  float o_acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o_acc[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  // The last touched box whose P V is not issued yet ("pending"): its P, the factor that takes O
  // to its row maxima (applied just before its P V is issued) and its stage.
  uint32_t p_prev[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) p_prev[i][0] = p_prev[i][1] = p_prev[i][2] = p_prev[i][3] = 0u;
  float alpha_prev[2] = {1.f, 1.f};
  bool pending = false;
  int prev_stage = 0;
  const float scale_log2 = p.scale_log2;

  const uint32_t q_addr = sbase + 64 * w * Cfg::kRowBytes;
  auto stage_k = [&](int s) { return sbase + Cfg::kStageOffset + s * 2 * Cfg::kBoxBytes; };

  auto rescale_o = [&]() {
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      o_acc[4 * n + 0] *= alpha_prev[0];
      o_acc[4 * n + 1] *= alpha_prev[0];
      o_acc[4 * n + 2] *= alpha_prev[1];
      o_acc[4 * n + 3] *= alpha_prev[1];
    }
  };
  // O += P_prev V(stage prev_stage): 4 k16 steps of 16 keys.
  auto issue_pv = [&]() {
    const uint32_t v_addr = stage_k(prev_stage) + Cfg::kBoxBytes;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t db = gmma_desc(v_addr + kk * 16 * Cfg::kRowBytes, Cfg::kBoxBlockBytes, 1024);
      if constexpr (D == 128) {
        Mma::rs_n128(o_acc, p_prev[kk], db);
      } else {
        Mma::rs_n64(o_acc, p_prev[kk], db);
      }
    }
  };
  // One arrival per warp once the warp's wgmmas reading the stage completed (wgmma.wait_group is
  // warp-synchronous: every lane has passed it).
  auto release = [&](int s) { mbar_arrive_if(bar_empty + 8 * s, lane == 0); };
  // Finishes the P V of the previous computed box (issued and waited on here), frees its stage.
  auto finish_pending_pv = [&](int prev) {
    rescale_o();
    reg_fence(o_acc);
    reg_fence(p_prev);
    wgmma_fence();
    issue_pv();
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(o_acc);
    reg_fence(p_prev);
    release(prev);
  };

  // S = Q K^T for the box in stage `stg`: D/16 k16 steps, Q and K from shared memory.
  auto issue_s = [&](float (&sc)[32], int stg) {
    const uint32_t k_addr = stage_k(stg);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // k16 slice within the 64-element block
      const uint64_t da = gmma_desc(q_addr + (kk / 4) * Cfg::kQBlockBytes + off, 16, 1024);
      const uint64_t db = gmma_desc(k_addr + (kk / 4) * Cfg::kBoxBlockBytes + off, 16, 1024);
      Mma::ss_n64(sc, da, db, kk > 0 ? 1 : 0);
    }
  };

  // Mask (where the box is not inside every window of the warp's rows), online softmax in base
  // 2 (the scale, > 0, folded into the exponent): sc becomes P (fp32), alpha the factor that
  // takes O to the new row maxima.
  // full_ax[a]: the box is inside every window of the warp's rows on axis a (that axis needs
  // no mask; the padding axes of rank-1/2 problems always are).
  auto softmax = [&](float (&sc)[32], const int (&org)[3], const bool (&full_ax)[3],
                     float (&alpha)[2]) {
    if (!(full_ax[0] && full_ax[1] && full_ax[2])) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint64_t m = ~0ull;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          if (full_ax[a]) continue;
          const int klo = min(max(rws[r][a] - org[a], 0), ext[a]);
          const int khi = max(min(rws[r][a] + rlen[r][a] - org[a], ext[a]), 0);
          const uint64_t iv = low_bits(khi << sh[a]) & ~low_bits(klo << sh[a]);
          m &= a == 0 ? iv : iv * rep[a];  // axis 0's period is the whole box (64 keys)
        }
        m >>= 2 * quad;  // this thread's columns: 8n + 2 quad + e
        const uint32_t mlo = static_cast<uint32_t>(m), mhi = static_cast<uint32_t>(m >> 32);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint32_t word = n < 4 ? mlo : mhi;
            if (!((word >> (8 * (n % 4) + e)) & 1u)) sc[4 * n + 2 * r + e] = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(sc[4 * n + 2 * r], sc[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float m_new = fmaxf(row_max[r], mx * scale_log2);
      const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
      alpha[r] = fast_exp2(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        sc[4 * n + 2 * r] = fast_exp2(fmaf(sc[4 * n + 2 * r], scale_log2, -m_use));
        sc[4 * n + 2 * r + 1] = fast_exp2(fmaf(sc[4 * n + 2 * r + 1], scale_log2, -m_use));
        sum += sc[4 * n + 2 * r] + sc[4 * n + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
  };
  // P (fp32 accumulator layout) as the A operand of P V: keys 16kk.. of rows g and g + 8.
  auto pack_p = [&](const float (&sc)[32]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      p_prev[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
      p_prev[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
      p_prev[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
      p_prev[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };

  mbar_wait(bar_q, 0);

  int bi[3] = {0, 0, 0};
  int stage = 0;
  uint32_t phase = 0;
#pragma unroll 1
  for (int j = 0; j < c.total; ++j) {
    int o[3];
    bool touch = active, full[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      o[a] = c.lo[a] + (bi[a] << c.kl[a]);
      const int box_hi = o[a] + ext[a];
      touch = touch && o[a] < uhi[a] && box_hi > ulo[a];
      full[a] = o[a] >= ilo[a] && box_hi <= ihi[a];
    }
    // Wait even for a box this warpgroup skips: its release must not run ahead of the
    // producer's refill of the stage (arrivals are only counted, not attributed to a use).
    mbar_wait(bar_full + 8 * stage, phase);
    fence_proxy_async();

    if (touch) {
      // S = Q K^T and, if a box is pending, its P V behind it (O rescaled first), so that this
      // box's softmax overlaps that P V. The two cases are separate code paths, so that the
      // compiler sees which wgmma groups are in flight on each; no register that a wgmma of the
      // batch reads is written between the batch's first wgmma and its wait, and after the last
      // wait only the release and register moves remain (nothing that would pull the wait ahead
      // of the softmax).
      float s[32];
      if (pending) {
        rescale_o();
        reg_fence(o_acc);
        reg_fence(p_prev);
        wgmma_fence();
        issue_s(s, stage);
        wgmma_commit();
        issue_pv();
        wgmma_commit();
        wgmma_wait<1>();
        reg_fence(s);
        float alpha[2];
        softmax(s, o, full, alpha);
        reg_fence(s);
        reg_fence(alpha);
        wgmma_wait<0>();  // the pending box's P V is done: its stage and P registers are free
        reg_fence(o_acc);
        reg_fence(p_prev);
        release(prev_stage);
        pack_p(s);
        alpha_prev[0] = alpha[0];
        alpha_prev[1] = alpha[1];
      } else {
        wgmma_fence();
        issue_s(s, stage);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(s);
        softmax(s, o, full, alpha_prev);
        pack_p(s);
      }
      prev_stage = stage;
      pending = true;
    } else {
      // Skipped box. A pending P V is finished first, so that no stage is held across a box
      // this warpgroup does not compute (the producer refills stages in order).
      if (pending) {
        finish_pending_pv(prev_stage);
        pending = false;
      }
      release(stage);
    }

    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
    NJ_NEXT_BOX(bi, c.nbox)
  }
  if (pending) finish_pending_pv(prev_stage);

  // ---- Epilogue: normalise, stage O in this warpgroup's rows of the Q buffer (every wgmma of
  // the warpgroup has completed: each warp waited for its last group), 16-byte global stores.
  named_barrier_sync(1 + w, kWGThreads);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row_base + grow + 8 * r;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      const uint32_t addr = sbase + (n / 8) * Cfg::kQBlockBytes + row * Cfg::kRowBytes +
                            ((((n % 8) ^ (row % 8))) << 4) + 4 * quad;
      st_shared_b32(addr, pack2<T>(o_acc[4 * n + 2 * r] * inv, o_acc[4 * n + 2 * r + 1] * inv));
    }
    if (quad == 0) {
      int cc[3];
      tile_coord(row, c.ql, cc);
      bool valid = true;
      int64_t off = c.b * p.lse_batch_stride + c.h;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const int x = c.q0[a] + cc[a];
        valid = valid && x < c.glen[a];
        off += static_cast<int64_t>(c.g[a] + x * c.dil[a]) * p.lse_token_stride[a];
      }
      if (valid)
        p.lse[off] = l > 0.f ? (row_max[r] + log2f(l)) * 0.69314718055994530942f : -INFINITY;
    }
  }
  named_barrier_sync(1 + w, kWGThreads);
  int64_t goff_q = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) goff_q += static_cast<int64_t>(c.g[a]) * p.q_token_stride[a];
  T* obase = static_cast<T*>(p.o) + c.b * p.q_batch_stride + goff_q + c.h * p.q_head_stride;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < (64 * kChunks) / kWGThreads; ++i) {
    const int idx = t + i * kWGThreads;
    const int row = 64 * w + idx / kChunks, chunk = idx % kChunks;
    int cc[3];
    tile_coord(row, c.ql, cc);
    bool valid = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const int x = c.q0[a] + cc[a];
      valid = valid && x < c.glen[a];
      off += static_cast<int64_t>(x) * c.dil[a] * p.q_token_stride[a];
    }
    if (valid) {
      const uint32_t addr = sbase + (chunk / 8) * Cfg::kQBlockBytes + row * Cfg::kRowBytes +
                            (((chunk % 8) ^ (row % 8)) << 4);
      *reinterpret_cast<uint4*>(obase + off + chunk * 8) = ld_shared_v4(addr);
    }
  }
}

template <typename T, int D, int NWG>
__global__ void __launch_bounds__(FwdConfig<D, NWG>::kThreads, FwdConfig<D, NWG>::kMinBlocks)
    fna_fwd_sm90_kernel(const __grid_constant__ FnaFwdParams p) {
#if NJ_SM90A
  using Cfg = FwdConfig<D, NWG>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sbase = smem_u32(smem);
  // The swizzled layouts need 1024-byte-aligned blocks; dynamic shared memory starts there when
  // the kernel has no static shared memory.
  if (sbase & 1023u) __trap();

  // ---- Which (batch, head, dilation group, Q tile) this CTA owns (as in the sm80 kernel).
  CtaWork c;
  c.b = blockIdx.z;
  c.h = blockIdx.y % p.heads;
  c.hkv = c.h / (p.heads / p.heads_kv);
  int grp = blockIdx.y / p.heads;
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    c.dil[a] = p.dilation[a];
    c.g[a] = grp % c.dil[a];
    grp /= c.dil[a];
  }
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
    c.glen[a] = group_extent(p.extent[a], c.dil[a], c.g[a]);
    if (c.q0[a] >= c.glen[a]) return;  // this group is shorter than group 0 on this axis
    const bool causal = p.causal[a] != 0;
    const int qlast = min(c.q0[a] + (1 << c.ql[a]), c.glen[a]) - 1;
    c.lo[a] = window_start(c.q0[a], p.kernel[a], p.stride[a], c.glen[a], causal);
    const int s_last = window_start(qlast, p.kernel[a], p.stride[a], c.glen[a], causal);
    c.hi[a] = window_end(qlast, s_last, p.kernel[a], causal);
    const int box = 1 << c.kl[a];
    c.nbox[a] = (c.hi[a] - c.lo[a] + box - 1) / box;
    c.total *= c.nbox[a];
  }

  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  if (threadIdx.x == 0) {
#pragma unroll 1
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(bar_full + 8 * s, kWGThreads);                    // full: producer threads
      mbar_init(bar_full + 8 * (Cfg::kStages + s), 4 * NWG);      // empty: consumer warps
    }
    mbar_init(bar_full + 16 * Cfg::kStages, kWGThreads);          // Q loaded
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kWGThreads, 0);
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    fwd_produce<T, D, NWG>(p, c, sbase, threadIdx.x);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    fwd_consume<T, D, NWG>(p, c, sbase, wg - 1, threadIdx.x - kWGThreads * wg);
  }
#else
  (void)p;
  __trap();  // built for another architecture: the host launcher never starts this
#endif
}

template <typename T, int D, int NWG>
cudaError_t launch(const FnaFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<D, NWG>;
  auto kernel = fna_fwd_sm90_kernel<T, D, NWG>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  // All of the unified L1 / shared memory as shared memory: two CTAs of the one-consumer variant
  // need ~226 KB per SM.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  const int groups = p.dilation[0] * p.dilation[1] * p.dilation[2];
  dim3 grid(p.num_q_tiles[0] * p.num_q_tiles[1] * p.num_q_tiles[2], p.heads * groups, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
