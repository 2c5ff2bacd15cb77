// The sm_90a dK/dV kernel (key-stationary; see fna_bwd_sm90.cuh for both backward kernels): CTA =
// producer warpgroup + two consumer warpgroups, one 64-key tile of one (batch, key/value head,
// dilation group), one CTA per SM. The producer loads K and V once, then for each query head of
// the GQA group and each Q box (64 queries) covering the tile's inverse neighborhood: Q, dO, and
// the rows' lse and delta (4-byte cp.async). Consumer warpgroup w takes the boxes t = w, w + 2,
// ... (the stage count is even, so stage s always belongs to warpgroup s % 2). Per box: S^T =
// K Q^T and dP^T = V dO^T (m64n64k16, K-major), P^T and dS^T in registers, dV += P^T dO and dK +=
// dS^T Q (m64nDk16, A from registers, dO / Q as MN-major B). The mask uses, per key row and
// axis, the interval of queries whose windows contain the key (the policy's inverse
// neighborhood, searched once). At the end the two warpgroups' partial sums are added through
// shared memory in a fixed order (warpgroup 0 finishes dK, warpgroup 1 dV); dK = scale * acc.
// Ragged batches: rows of keys outside their sample store zeros (store_tile), computed like the
// rows past the extent; a tile outside its sample stores zeros without computing.
#pragma once

#include "natten_jax/fna/sm90_bwd_common.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {
namespace bwd {

// Resident: K and V; stage s: Q tile, dO tile, then (at kMetaOff from the stage start) lse[64]
// and delta[64] (fp32; padded to keep the tiles 1 KB aligned). The stage count is even: stage s
// belongs to consumer s % 2. One CTA per SM.
template <int D>
struct DkvConfig : BwdLayout<D, 2, 1, D == 128 ? 4 : 6, 1024, 56, 224> {
  static constexpr int kKOff = 0;
  static constexpr int kVOff = DkvConfig::kTileBytes;
  static constexpr int kMetaOff = 2 * DkvConfig::kTileBytes;
  // The final reduction: one fp32 accumulator per consumer warpgroup in the stage region.
  static_assert(2 * kWG * (D / 2) * 4 <= DkvConfig::kStages * DkvConfig::kStageBytes,
                "reduction buffer");
};

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
  Neighborhood gi;  // of the sample (ragged batches)
  int k0[3];
};
__device__ __forceinline__ DkvTile dkv_tile(const FnaBwdParams& bp, int x, int y, int z) {
  const FnaFwdParams& p = bp.f;
  int ext[3];
  sample_extents(p, z, ext);
  int hkv;
  const int group = divmod(y, p.heads_kv, hkv);
  DkvTile e{z, hkv, Neighborhood(ext, p.kernel, p.stride, p.dilation, p.causal, group), {0, 0, 0}};
  tile_origin(x, bp.num_kv_tiles, p.kv_tile_log2, e.k0);
  return e;
}

template <typename T, int D>
__device__ __forceinline__ void dkv_produce(const FnaBwdParams& bp, const Neighborhood& gi,
                                            const DkvWork& c, uint32_t sbase, int pt) {
  using Cfg = DkvConfig<D>;
  using Ld = TileLoader<T, D>;
  const FnaFwdParams& p = bp.f;
  const Ld ld(pt);
  const uint32_t bar_full = sbase + Cfg::kBarOff;
  const uint32_t bar_empty = bar_full + 8 * Cfg::kStages;
  const uint32_t bar_kv = bar_full + 16 * Cfg::kStages;

  int64_t goff_q, goff_kv, qst[3], kvst[3];
  group_layout(gi.g, gi.dil, p.q_token_stride, goff_q, qst);
  group_layout(gi.g, gi.dil, p.kv_token_stride, goff_kv, kvst);
  int64_t off[Ld::kPasses];
  {
    ld.row_offsets(c.kl, kvst, off);
    int64_t org = c.b * p.kv_batch_stride + goff_kv + c.hkv * p.kv_head_stride + ld.chunk * 8;
#pragma unroll
    for (int a = 0; a < 3; ++a) org += c.k0[a] * kvst[a];
    const uint32_t dst[2] = {sbase + Cfg::kKOff, sbase + Cfg::kVOff};
    const T* const src[2] = {static_cast<const T*>(p.k) + org, static_cast<const T*>(p.v) + org};
    ld.load(dst, src, off, tile_inside(c.k0, c.kl, gi.glen), c.k0, gi.glen, c.kl);
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
    bool svalid = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      box_off += o[a] * (static_cast<int64_t>(p.dilation[a]) * p.q_token_stride[a]);
      lse_off += static_cast<int64_t>(o[a]) * p.dilation[a] * p.lse_token_stride[a];
      svalid = svalid && o[a] + scc[a] < gi.glen[a];
    }
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t st_addr = sbase + Cfg::kStageOff + stage * Cfg::kStageBytes;
    const uint32_t dst[2] = {st_addr, st_addr + Cfg::kTileBytes};
    const T* const src[2] = {qb + box_off, db + box_off};
    ld.load(dst, src, off, tile_inside(o, c.ql, gi.glen), o, gi.glen, c.ql);
    cp_async4(st_addr + sdst, svalid ? sptr + lse_off : sptr, svalid);
    cp_async_arrive_noinc(bar_full + 8 * stage);
    NJ_NEXT_STAGE(stage, phase, Cfg::kStages)
  }
  cp_async_wait_all();
}

template <typename T, int D>
__device__ __forceinline__ void dkv_consume(const FnaBwdParams& bp, const Neighborhood& gi,
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
  // extent (or past the sample's, in a ragged batch) take the last valid key (stored as zeros
  // or not at all). The warp's intersection [wlo, whi) marks the boxes that need no mask on an
  // axis.
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
        const Interval inv = gi.inverse(a, x, x, c.ilo[a], c.ihi[a]);
        qlo[r][a] = inv.lo;
        qhi[r][a] = inv.hi;
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
    issue_ss<T, D, kBlockBytes, kBlockBytes>(s, sbase + Cfg::kKOff, q_addr);
    wgmma_commit();
    issue_ss<T, D, kBlockBytes, kBlockBytes>(dp, sbase + Cfg::kVOff, do_addr);
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
      const BoxKeyMask bm(c.ql);
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
    const float scale[2] = {scale_log2 / kLog2e, scale_log2 / kLog2e};
    stage_acc<T, D, kBlockBytes>(out_tile, dk, scale, warp, lane);
  } else {
    const float one[2] = {1.f, 1.f};
    stage_acc<T, D, kBlockBytes>(out_tile, dv, one, warp, lane);
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
  int span[3];
  group_span(p, e.gi, span);
  store_tile<T, D, kBlockBytes>(out, out_tile, p.kv_token_stride, e.gi.dil, e.k0, e.gi.glen,
                                span, p.kv_tile_log2, 0, t);
}

template <typename T, int D>
__global__ void __launch_bounds__(DkvConfig<D>::kThreads, DkvConfig<D>::kMinBlocks)
    fna_bwd_dkdv_sm90_kernel(const __grid_constant__ FnaBwdParams bp) {
#if NJ_SM90A
  using Cfg = DkvConfig<D>;
  const FnaFwdParams& p = bp.f;
  extern __shared__ __align__(1024) unsigned char smem[];  // no static smem: aligned (host checks)
  const uint32_t sbase = smem_u32(smem);
  
  DkvWork c;
  const DkvTile e = dkv_tile(bp, blockIdx.x, blockIdx.y, blockIdx.z);
  const Neighborhood& gi = e.gi;
  c.b = e.b;
  c.hkv = e.hkv;
  c.group_heads = p.heads_per_kv;
#pragma unroll
  for (int a = 0; a < 3; ++a) c.k0[a] = e.k0[a];
  if (c.k0[0] >= gi.glen[0] || c.k0[1] >= gi.glen[1] || c.k0[2] >= gi.glen[2]) {
    // Past the sample's group: a tile inside the tensor's (ragged batch) stores zero gradients.
    if (p.valid_extent != nullptr)
      store_padded_kv_tile<T, D>(bp, Cfg::kThreads);
    return;
  }
  c.boxes = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    c.ql[a] = p.q_tile_log2[a];
    c.kl[a] = p.kv_tile_log2[a];
    // Inverse neighborhood: the queries whose windows meet the tile's keys.
    const Interval inv = gi.inverse(a, c.k0[a], gi.tile_last(a, c.k0[a], c.kl[a]));
    c.ilo[a] = inv.lo;
    c.ihi[a] = inv.hi;
    c.nq[a] = inv.hi > inv.lo ? tiles_covering(inv.hi - inv.lo, c.ql[a]) : 0;
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

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
