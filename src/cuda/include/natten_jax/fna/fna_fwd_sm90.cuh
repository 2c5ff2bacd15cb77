// Fused neighborhood attention forward, Hopper path (sm_90a): warpgroup MMA (wgmma), a producer
// warpgroup that loads KV boxes with cp.async into a multi-stage mbarrier pipeline, and one or two
// consumer warpgroups of 64 query rows each.
//
// Same problem decomposition as the sm80 kernel (fna_fwd_sm80.cuh): one CTA computes one Q tile
// of 64 * NWG queries (a multi-dimensional box of 2^a x 2^b x 2^c tokens of one dilation group)
// for one (batch, head); it visits the union of its queries' windows as KV boxes of BK keys (64,
// or 128 with two consumer warpgroups; also multi-dimensional, starting at the union's corner).
// Outputs (O, and the natural-log LSE in fp32) follow the sm80 kernel's conventions exactly.
//
// Warpgroup roles (4 warps each):
//   * WG 0, producer: loads the Q tile, then box after box K and V into `kStages` stages with
//     predicated cp.async (zero fill outside the union / the group; TileLoader of
//     sm90_tile_io.cuh), into the 128-byte-swizzled wgmma layout; each stage's completion is
//     tracked by a `full` mbarrier (one cp.async.mbarrier.arrive.noinc per producer thread). It
//     waits for a stage's `empty` mbarrier (one arrival per consumer warp) before refilling it.
//   * WG 1..NWG, consumers: WG w owns Q-tile rows [64(w-1), 64w). Per box it touches:
//     S = Q K^T (wgmma m64nBKk16, Q and K from shared memory), the neighborhood mask where the
//     box is not inside every window of the warp's rows (64-bit key masks per row, one per 64
//     keys: BoxKeyMask of the neighborhood policy), online softmax in fp32 registers, then
//     O += P V (wgmma m64nDk16, P from registers, V from shared memory as an MN-major operand).
//     The P V product of box j is issued together with S of the next touched box, so the
//     softmax of one box overlaps the P V GEMM of the previous one. Two consumer warpgroups take
//     turns to issue their GEMMs (ping-pong on named barriers), so that one's softmax overlaps
//     the other's GEMMs. A box outside the union of the warpgroup's windows is skipped (released
//     without any MMA).
// O is staged through the warpgroup's part of the Q buffer for 16-byte global stores. Ragged
// batches: a tile outside its sample stores zeros (O and LSE) and computes nothing; padded rows
// of a partly covered tile store zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/sm90_gemm.cuh"
#include "natten_jax/fna/sm90_softmax.cuh"
#include "natten_jax/fna/sm90_tile_io.cuh"
#include "natten_jax/fna/sm90_tma.cuh"
#include "natten_jax/neighborhood.cuh"

#include <type_traits>

namespace natten_jax {
namespace fna {
namespace sm90 {

// BK: keys per KV box, 64 or 128 (a 64 x 128 score tile per consumer warpgroup; with two
// consumer warpgroups only, as the stages of one CTA of 128-key boxes fill the shared memory).
// Named barriers of the consumers: 1 + w, warpgroup w's epilogue; kTurnBarrier + w, its turn
// to issue GEMMs (ping-pong of two consumer warpgroups).
constexpr int kTurnBarrier = 3;

template <int D, int NWG, int BK>
struct FwdConfig {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static_assert(NWG == 1 || NWG == 2, "one or two consumer warpgroups");
  static_assert(BK == 64 || (BK == 128 && NWG == 2), "64-key boxes, or 128 with two consumers");
  static constexpr int kBoxKeys = BK;
  static constexpr int kScoreRegs = BK / 2;  // fp32 scores of a box per consumer thread
  static constexpr int kPvSteps = BK / 16;   // k16 steps of P V
  static constexpr int kThreads = kWGThreads * (NWG + 1);
  // One consumer warpgroup: two CTAs per SM (registers and shared memory sized for it).
  static constexpr int kMinBlocks = NWG == 1 ? 2 : 1;
  static constexpr int kQRows = 64 * NWG;
  static constexpr int kQBlockBytes = kQRows * kRowBytes;      // one column block of the Q tile
  static constexpr int kBoxBlockBytes = kBoxKeys * kRowBytes;  // one column block of a box
  static constexpr int kQBytes = kQRows * D * 2;
  static constexpr int kBoxBytes = kBoxKeys * D * 2;  // K (or V) of one box
  static constexpr int kStages =
      BK == 128 ? (D == 128 ? 3 : 5) : NWG == 2 ? (D == 128 ? 4 : 6) : (D == 128 ? 3 : 6);
  static constexpr int kStageOffset = kQBytes;        // stage s: K, then V
  static constexpr int kBarOffset = kQBytes + kStages * 2 * kBoxBytes;
  static constexpr int kSmemBytes = kBarOffset + (2 * kStages + 1) * 8;
  // Producer threads per K / V row (TileLoader): 8 for 128-key boxes, so that a thread keeps
  // the offsets of 8 rows (not 16) within the producer's 64 registers (16: ptxas spills 280 B).
  static constexpr int kLoadRowThreads = BK == 128 ? 8 : D / 8;
  static constexpr int kProducerRegs = 64;
  static constexpr int kConsumerRegs = NWG == 2 ? 216 : 192;
  // Registers at launch x threads must cover what the warpgroups hold after reallocation.
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * NWG <=
                    (65536 / kMinBlocks / kThreads) / 8 * 8 * kThreads,
                "register reallocation exceeds the launch budget");
  static_assert(kMinBlocks * (kSmemBytes + 1024) <= 233472, "shared memory per SM");
};

using CtaWork = QTileWork;  // what both roles know about the CTA's work

// ---- Producer warpgroup: Q tile, then every KV box of the union (cp.async, or with Args =
// FwdTmaArgs TMA copies by one thread: sm90_tma.cuh).
template <typename T, int D, int NWG, int BK, typename Args>
__device__ __forceinline__ void fwd_produce(const Args& args, const CtaWork& c, uint32_t sbase,
                                            int pt) {
  using Cfg = FwdConfig<D, NWG, BK>;
  const FnaFwdParams& p = params_of(args);
  using QLoader = TileLoader<T, D, Cfg::kQRows>;
  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  // Q tile (rows beyond the group's extent are zero).
  {
    const QLoader qld(pt);
    int64_t goff, qst[3], off[QLoader::kPasses];
    group_layout(c.nb.g, c.nb.dil, p.q_token_stride, goff, qst);
    qld.row_offsets(c.ql, qst, off);
    int64_t org = c.b * p.q_batch_stride + goff + c.h * p.q_head_stride + qld.chunk * 8;
#pragma unroll
    for (int a = 0; a < 3; ++a) org += c.q0[a] * qst[a];
    const uint32_t dst[1] = {sbase};
    const T* const src[1] = {static_cast<const T*>(p.q) + org};
    qld.load(dst, src, off, tile_inside(c.q0, c.ql, c.nb.glen), c.q0, c.nb.glen, c.ql);
    cp_async_arrive_noinc(bar_q);
  }
  if constexpr (std::is_same<Args, FwdTmaArgs>::value) {
    produce_kv_boxes_tma<D, Cfg::kStages, 2 * Cfg::kBoxBytes, Cfg::kBoxBytes, BK>(
        args, c, pt, sbase + Cfg::kStageOffset, bar_full, bar_empty);
  } else {
    produce_kv_boxes<T, D, Cfg::kStages, 2 * Cfg::kBoxBytes, Cfg::kBoxBytes, Cfg::kLoadRowThreads,
                     BK>(p, c, pt, sbase + Cfg::kStageOffset, bar_full, bar_empty);
  }
}

// Which keys the rows of one consumer thread see (neighborhood policy): boxes outside the
// union of the warpgroup's windows are skipped; boxes inside the intersection of the warp's
// windows on an axis need no mask there; the thread's two rows' windows build the key mask.
struct ConsumerWindows {
  int ulo[3], uhi[3], ilo[3], ihi[3];
  bool active;             // the warpgroup has rows inside the group
  int rlo[2][3], rhi[2][3];  // windows of rows row_base + grow (+ 8)

  __device__ __forceinline__ ConsumerWindows(const CtaWork& c, int w, int row_base, int grow) {
    active = rows_windows(c.nb, c.q0, c.ql, 64 * w, 64, ulo, uhi, nullptr, nullptr);
    rows_windows(c.nb, c.q0, c.ql, row_base, 16, nullptr, nullptr, ilo, ihi);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const Interval win = row_window(c.nb, c.q0, c.ql, row_base + grow + 8 * r, a);
        rlo[r][a] = win.lo;
        rhi[r][a] = win.hi;
      }
  }
  // The box at origin o (extents ext): whether the warpgroup computes it, and per axis whether
  // every row of the warp sees all of it.
  __device__ __forceinline__ bool classify(const int (&o)[3], const int* kl,
                                           bool (&full)[3]) const {
    bool touch;
    classify_box(o, kl, ulo, uhi, ilo, ihi, active, touch, full);
    return touch;
  }
};

// ---- Consumer epilogue: normalise, stage O in this warpgroup's rows of the Q buffer (every
// wgmma of the warpgroup has completed: each warp waited for its last group), write the LSE and
// then O with 16-byte stores of the rows inside the group.
template <typename T, int D, int NWG, int BK>
__device__ __forceinline__ void fwd_epilogue(const FnaFwdParams& p, const CtaWork& c,
                                             const OnlineSoftmax& sm, const float (&o_acc)[D / 2],
                                             uint32_t sbase, int w, int t) {
  using Cfg = FwdConfig<D, NWG, BK>;
  const int warp = t / 32, lane = t % 32, grow = lane / 4;
  named_barrier_sync(1 + w, kWGThreads);
  float inv[2], lse[2];
  sm.finish(inv, lse);
  int span[3];
  group_span(p, c.nb, span);
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (!c.row_inside(64 * w + 16 * warp + grow + 8 * r)) inv[r] = lse[r] = 0.f;  // padded query
  stage_acc<T, D, Cfg::kQBlockBytes>(sbase + 64 * w * kRowBytes, o_acc, inv, warp, lane);
  if (lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int cc[3];
      tile_coord(64 * w + 16 * warp + grow + 8 * r, c.ql, cc);
      bool valid = true;
      int64_t off = c.b * p.lse_batch_stride + c.h;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const int x = c.q0[a] + cc[a];
        valid = valid && x < span[a];
        off += static_cast<int64_t>(c.nb.g[a] + x * c.nb.dil[a]) * p.lse_token_stride[a];
      }
      if (valid) p.lse[off] = lse[r];
    }
  }
  named_barrier_sync(1 + w, kWGThreads);
  int64_t goff_q = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) goff_q += static_cast<int64_t>(c.nb.g[a]) * p.q_token_stride[a];
  T* obase = static_cast<T*>(p.o) + c.b * p.q_batch_stride + goff_q + c.h * p.q_head_stride;
  store_tile<T, D, Cfg::kQBlockBytes>(obase, sbase, p.q_token_stride, c.nb.dil, c.q0, c.nb.glen,
                                      span, c.ql, 64 * w, t);
}

// ---- Consumer warpgroup w (0-based): Q-tile rows [64w, 64w + 64). kTma: the stages are
// written by TMA (async proxy), so no proxy fence after a stage's wait.
template <typename T, int D, int NWG, int BK, bool kTma>
__device__ __forceinline__ void fwd_consume(const FnaFwdParams& p, const CtaWork& c,
                                            uint32_t sbase, int w, int t) {
  using Cfg = FwdConfig<D, NWG, BK>;
  constexpr int NS = Cfg::kScoreRegs, KK = Cfg::kPvSteps, NH = BK / 64;
  const int warp = t / 32, lane = t % 32, quad = lane % 4, grow = lane / 4;
  const int row_base = 64 * w + 16 * warp;  // first Q-tile row of this warp
  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_q = bar_full + 16 * Cfg::kStages;

  const ConsumerWindows win(c, w, row_base, grow);
  const BoxKeyMask bm(c.kl);
  OnlineSoftmax sm;

  float o_acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o_acc[i] = 0.f;
  // The last touched box whose P V is not issued yet ("pending"): its P, the factor that takes O
  // to its row maxima (applied just before its P V is issued) and its stage.
  uint32_t p_prev[KK][4];
#pragma unroll
  for (int i = 0; i < KK; ++i) p_prev[i][0] = p_prev[i][1] = p_prev[i][2] = p_prev[i][3] = 0u;
  float alpha_prev[2] = {1.f, 1.f};
  bool pending = false;
  int prev_stage = 0;
  const float scale_log2 = p.scale_log2;

  const uint32_t q_addr = sbase + 64 * w * kRowBytes;
  auto stage_k = [&](int s) { return sbase + Cfg::kStageOffset + s * 2 * Cfg::kBoxBytes; };

  auto rescale_o = [&]() {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o_acc[4 * n + 0] *= alpha_prev[0];
      o_acc[4 * n + 1] *= alpha_prev[0];
      o_acc[4 * n + 2] *= alpha_prev[1];
      o_acc[4 * n + 3] *= alpha_prev[1];
    }
  };
  // Ping-pong of the two consumer warpgroups (FlashAttention-3's warp scheduler barriers):
  // a warpgroup issues a box's GEMMs only after the other issued its GEMMs of the previous box,
  // so that one warpgroup's softmax runs while the other's GEMMs keep the tensor cores busy.
  // Turn barrier kTurnBarrier + w (both warpgroups: this one syncs, the other arrives). Each
  // warpgroup takes one turn per box, computed or skipped, so the turns stay matched; the first
  // warpgroup gives itself the first turn.
  constexpr bool kPingPong = NWG == 2;
  auto take_turn = [&]() {
    if constexpr (kPingPong) named_barrier_sync(kTurnBarrier + w, 2 * kWGThreads);
  };
  auto pass_turn = [&]() {
    if constexpr (kPingPong) named_barrier_arrive(kTurnBarrier + 1 - w, 2 * kWGThreads);
  };
  // O += P_prev V(stage prev_stage).
  auto issue_pv = [&]() { issue_rs<T, D>(o_acc, p_prev, stage_k(prev_stage) + Cfg::kBoxBytes); };
  // One arrival per warp once the warp's wgmmas reading the stage completed (wgmma.wait_group is
  // warp-synchronous: every lane has passed it).
  auto release = [&](int s) { mbar_arrive_if(bar_empty + 8 * s, lane == 0); };
  // Finishes the P V of the previous computed box: issues it, calls after_issue (the end of
  // the warpgroup's turn, if it has one), waits for it and frees its stage.
  auto finish_pending_pv = [&](int prev, auto&& after_issue) {
    rescale_o();
    reg_fence(o_acc);
    reg_fence(p_prev);
    wgmma_fence();
    issue_pv();
    wgmma_commit();
    after_issue();
    wgmma_wait<0>();
    reg_fence(o_acc);
    reg_fence(p_prev);
    release(prev);
  };
  // S = Q K^T for the box in stage `stg`.
  auto issue_s = [&](float (&sc)[NS], int stg) {
    issue_ss<T, D, Cfg::kQBlockBytes, Cfg::kBoxBlockBytes>(sc, q_addr, stage_k(stg));
  };
  // Key mask (where the box at org is not inside every window of the warp's rows on every
  // axis; full_ax[a]: no mask needed on axis a), then online softmax: sc becomes P (fp32),
  // alpha the factor that takes O to the new row maxima.
  auto softmax = [&](float (&sc)[NS], const int (&org)[3], const bool (&full_ax)[3],
                     float (&alpha)[2]) {
    if (!(full_ax[0] && full_ax[1] && full_ax[2])) {
      uint64_t m[NH][2];
      m[0][0] = bm.mask(win.rlo[0], win.rhi[0], org, full_ax) >> (2 * quad);
      m[0][1] = bm.mask(win.rlo[1], win.rhi[1], org, full_ax) >> (2 * quad);
      if constexpr (NH == 2) {  // the box's second 64 keys
        m[NH - 1][0] = bm.mask<1>(win.rlo[0], win.rhi[0], org, full_ax) >> (2 * quad);
        m[NH - 1][1] = bm.mask<1>(win.rlo[1], win.rhi[1], org, full_ax) >> (2 * quad);
      }
      apply_key_mask(sc, m, -INFINITY);
    }
    sm.step(sc, scale_log2, alpha);
  };

  mbar_wait(bar_q, 0);
  if (kPingPong && w == 0) named_barrier_arrive(kTurnBarrier, 2 * kWGThreads);

  for_each_box<Cfg::kStages>(c, [&](int stage, uint32_t phase, const int (&o)[3]) {
    bool full[3];
    const bool touch = win.classify(o, c.kl, full);
    // Wait even for a box this warpgroup skips: its release must not run ahead of the
    // producer's refill of the stage (arrivals are only counted, not attributed to a use).
    mbar_wait(bar_full + 8 * stage, phase);
    if constexpr (!kTma) fence_proxy_async();

    if (touch) {
      // S = Q K^T and, if a box is pending, its P V behind it (O rescaled first), so that this
      // box's softmax overlaps that P V. The two cases are separate code paths, so that the
      // compiler sees which wgmma groups are in flight on each; no register that a wgmma of the
      // batch reads is written between the batch's first wgmma and its wait, and after the last
      // wait only the release and register moves remain (nothing that would pull the wait ahead
      // of the softmax).
      float s[NS];
      if (pending) {
        take_turn();
        rescale_o();
        reg_fence(o_acc);
        reg_fence(p_prev);
        wgmma_fence();
        issue_s(s, stage);
        wgmma_commit();
        issue_pv();
        wgmma_commit();
        pass_turn();
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
        pack_a<T>(p_prev, s);
        alpha_prev[0] = alpha[0];
        alpha_prev[1] = alpha[1];
      } else {
        take_turn();
        wgmma_fence();
        issue_s(s, stage);
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        reg_fence(s);
        softmax(s, o, full, alpha_prev);
        pack_a<T>(p_prev, s);
      }
      prev_stage = stage;
      pending = true;
    } else {
      // Skipped box. A pending P V is finished first, so that no stage is held across a box
      // this warpgroup does not compute (the producer refills stages in order).
      take_turn();
      if (pending) {
        finish_pending_pv(prev_stage, pass_turn);
        pending = false;
      } else {
        pass_turn();
      }
      release(stage);
    }
  });
  if (pending) finish_pending_pv(prev_stage, [] {});

  fwd_epilogue<T, D, NWG, BK>(p, c, sm, o_acc, sbase, w, t);
}

template <typename T, int D, int NWG, int BK, typename Args = FnaFwdParams>
__global__ void __launch_bounds__(FwdConfig<D, NWG, BK>::kThreads,
                                  FwdConfig<D, NWG, BK>::kMinBlocks)
    fna_fwd_sm90_kernel(const __grid_constant__ Args args) {
#if NJ_SM90A
  using Cfg = FwdConfig<D, NWG, BK>;
  constexpr bool kTma = std::is_same<Args, FwdTmaArgs>::value;
  const FnaFwdParams& p = params_of(args);
  // The swizzled layouts need 1024-byte-aligned blocks: the kernel has no static shared memory
  // (the host checks), so its dynamic shared memory starts at the declared alignment.
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sbase = smem_u32(smem);

  // ---- Which (batch, head, dilation group, Q tile) this CTA owns, and the KV range it visits.
  CtaWork c;
  if (!c.init(p)) {
    if (c.padded) store_padded_q_tile<T, D>(p, p.o, p.lse, Cfg::kThreads);
    return;
  }

  const uint32_t bar_full = sbase + Cfg::kBarOffset;
  if (threadIdx.x == 0) {
#pragma unroll 1
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(bar_full + 8 * s, kTma ? 1 : kWGThreads);  // full: producer threads (TMA: 1)
      mbar_init(bar_full + 8 * (Cfg::kStages + s), 4 * NWG);      // empty: consumer warps
    }
    mbar_init(bar_full + 16 * Cfg::kStages, kWGThreads);          // Q loaded
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kWGThreads, 0);
  if (wg == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    fwd_produce<T, D, NWG, BK>(args, c, sbase, threadIdx.x);
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    fwd_consume<T, D, NWG, BK, kTma>(p, c, sbase, wg - 1, threadIdx.x - kWGThreads * wg);
  }
#else
  (void)args;
  __trap();  // built for another architecture: the host launcher never starts this
#endif
}

// All of the unified L1 / shared memory as shared memory: two CTAs of the one-consumer variant
// need ~226 KB per SM.
template <typename T, int D, int NWG, int BK>
cudaError_t launch(const FnaFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<D, NWG, BK>;
  return launch_kernel(fna_fwd_sm90_kernel<T, D, NWG, BK>, q_tile_grid(p), Cfg::kThreads,
                       Cfg::kSmemBytes, true, p, stream);
}

// The TMA variant (two consumer warpgroups, 128-key boxes; sm90_tma.cuh).
template <typename T, int D>
cudaError_t launch_tma(const FwdTmaArgs& a, cudaStream_t stream) {
  using Cfg = FwdConfig<D, 2, 128>;
  return launch_kernel(fna_fwd_sm90_kernel<T, D, 2, 128, FwdTmaArgs>, q_tile_grid(a.p),
                       Cfg::kThreads, Cfg::kSmemBytes, true, a, stream);
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
