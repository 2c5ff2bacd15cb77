// The sm_90a dQ kernel (query-stationary; see fna_bwd_sm90.cuh for both backward kernels): CTA =
// producer warpgroup + one consumer warpgroup owning a 64-query tile of one (batch, head,
// dilation group); two CTAs per SM. The producer loads Q and dO once, then K and V of every KV
// box (64 keys) covering the union of the tile's windows. Per box: S = Q K^T and dP = dO V^T
// (wgmma m64n64k16, all operands K-major in shared memory), P and dS = P (dP - delta) in
// registers (masked where the box is not inside every window of the warp's rows), dQ += dS K
// (wgmma m64nDk16, dS from registers, K as the MN-major B). dQ = scale * acc, rows past the
// extent not written. Ragged batches: padded rows (zero Q and dO, lse and delta 0) give dS = 0,
// so their dQ rows store zeros; a tile outside its sample stores zeros without computing.
#pragma once

#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm90_bwd_common.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {
namespace bwd {

// Resident: Q and dO; stage s: K, then V. Two CTAs per SM.
template <int D>
struct DqConfig : BwdLayout<D, 1, 2, D == 128 ? 2 : 4, 0, 64, 192> {
  static constexpr int kQOff = 0;
  static constexpr int kDoOff = DqConfig::kTileBytes;
};

using DqWork = QTileWork;

template <typename T, int D>
__device__ __forceinline__ void dq_produce(const FnaBwdParams& bp, const DqWork& c,
                                           uint32_t sbase, int pt) {
  using Cfg = DqConfig<D>;
  using Ld = TileLoader<T, D>;
  const FnaFwdParams& p = bp.f;
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  // Q and dO of the tile (rows beyond the group's extent are zero).
  {
    const Ld ld(pt);
    int64_t goff, qst[3], off[Ld::kPasses];
    group_layout(c.nb.g, c.nb.dil, p.q_token_stride, goff, qst);
    ld.row_offsets(c.ql, qst, off);
    int64_t org = c.b * p.q_batch_stride + goff + c.h * p.q_head_stride + ld.chunk * 8;
#pragma unroll
    for (int a = 0; a < 3; ++a) org += c.q0[a] * qst[a];
    const uint32_t dst[2] = {sbase + Cfg::kQOff, sbase + Cfg::kDoOff};
    const T* const src[2] = {static_cast<const T*>(p.q) + org,
                             static_cast<const T*>(bp.dout) + org};
    ld.load(dst, src, off, tile_inside(c.q0, c.ql, c.nb.glen), c.q0, c.nb.glen, c.ql);
    cp_async_arrive_noinc(bar_q);
  }
  produce_kv_boxes<T, D, Cfg::kStages, Cfg::kStageBytes, Cfg::kTileBytes>(
      p, c, pt, sbase + Cfg::kStageOff, bar_full, bar_empty);
}

template <typename T, int D>
__device__ __forceinline__ void dq_consume(const FnaBwdParams& bp, const Neighborhood& gi,
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
  rows_windows(gi, c.q0, c.ql, row_base, 16, nullptr, nullptr, ilo, ihi);
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
      const Interval win = gi.window(a, x);
      rlo[r][a] = win.lo;
      rhi[r][a] = win.hi;
      off += static_cast<int64_t>(gi.g[a] + x * gi.dil[a]) * p.lse_token_stride[a];
    }
    lse2[r] = valid ? p.lse[off] * kLog2e : 0.f;
    dlt[r] = valid ? bp.delta[off] : 0.f;
  }
  const BoxKeyMask bm(c.kl);
  const float scale_log2 = p.scale_log2;

  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;

  mbar_wait(bar_q, 0);

  for_each_box<Cfg::kStages>(c, [&](int stage, uint32_t phase, const int (&o)[3]) {
    bool full[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
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
    issue_ss<T, D, kBlockBytes, kBlockBytes>(s, sbase + Cfg::kQOff, k_addr);
    wgmma_commit();
    issue_ss<T, D, kBlockBytes, kBlockBytes>(dp, sbase + Cfg::kDoOff, v_addr);
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
  });

  // Epilogue: dQ = scale * acc through the (now unused) Q tile, 16-byte stores of valid rows.
  named_barrier_sync(1, kWG);
  const float scale[2] = {scale_log2 / kLog2e, scale_log2 / kLog2e};
  stage_acc<T, D, kBlockBytes>(sbase + Cfg::kQOff, dq, scale, warp, lane);
  named_barrier_sync(1, kWG);
  int64_t goff_q = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
  int span[3];
  group_span(p, gi, span);
  store_tile<T, D, kBlockBytes>(
      static_cast<T*>(bp.dq) + c.b * p.q_batch_stride + goff_q + c.h * p.q_head_stride,
      sbase + Cfg::kQOff, p.q_token_stride, gi.dil, c.q0, gi.glen, span, c.ql, 0, t);
}

template <typename T, int D>
__global__ void __launch_bounds__(DqConfig<D>::kThreads, DqConfig<D>::kMinBlocks)
    fna_bwd_dq_sm90_kernel(const __grid_constant__ FnaBwdParams bp) {
#if NJ_SM90A
  using Cfg = DqConfig<D>;
  const FnaFwdParams& p = bp.f;
  extern __shared__ __align__(1024) unsigned char smem[];  // no static smem: aligned (host checks)
  const uint32_t sbase = smem_u32(smem);
  
  DqWork c;
  if (!c.init(p)) {
    if (c.padded) store_padded_q_tile<T, D>(p, bp.dq, nullptr, Cfg::kThreads);
    return;
  }
  const Neighborhood& gi = c.nb;

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
    dq_produce<T, D>(bp, c, sbase, threadIdx.x);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    dq_consume<T, D>(bp, gi, c, sbase, threadIdx.x - kWG);
  }
#else
  (void)bp;
  __trap();  // built for another architecture: the host launcher never starts this
#endif
}

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
