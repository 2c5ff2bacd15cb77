// Fused neighborhood attention backward, tensor-core path (mma.sync: m16n8k16 for fp16 / bf16,
// TF32 m16n8k8 for float32; sm80_frag.cuh): two
// deterministic kernels (no atomics), both recomputing P = exp(scale * Q K^T - lse):
//
// * dQ (query-stationary, the forward's structure): a CTA owns a 64-query tile and visits the
//   KV boxes covering the union of its windows; dS = P * (dO V^T - delta); dQ = scale * dS K.
// * dK/dV (key-stationary): a CTA owns a 64-key tile of one key/value head and visits, for each
//   query head of its group (GQA: the sum over the group), the Q boxes covering the tile's
//   inverse neighborhood (the queries whose windows reach it); dV += P^T dO, dK += scale dS^T Q.
//
// delta = rowsum(dO * O) - d(lse) comes from the caller (one fused XLA reduction). Ragged
// batches: windows of the sample's extent (padded rows get P = 0, so zero gradients), tiles
// outside the sample store zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm80_common.cuh"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {
namespace sm80 {

constexpr float kLog2e = 1.4426950408889634f;

// Element offset of a token's row (in-group coordinates x) from the group's base pointer.
__device__ __forceinline__ int64_t token_offset(const int* x, const FastDiv* dil,
                                                const int64_t* stride) {
  return static_cast<int64_t>(x[0]) * dil[0] * stride[0] +
         static_cast<int64_t>(x[1]) * dil[1] * stride[1] +
         static_cast<int64_t>(x[2]) * dil[2] * stride[2];
}

// Writes 64 rows (tile rows r, token origin + tile_coord(r)) from shared memory to global,
// skipping rows outside `limit`.
template <typename T, int D>
__device__ __forceinline__ void store_tile(T* base, const T* smem, const int64_t* tok_stride,
                                           const FastDiv* dil, const int* origin, const int* limit,
                                           const int* l2, int tid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  constexpr int kChunks = D / kVec;
  constexpr int kPitch = tile_pitch<T, D>();
#pragma unroll
  for (int i = 0; i < (kTileKV * kChunks) / kThreads; ++i) {
    int idx = tid + i * kThreads;
    int row = idx / kChunks, chunk = idx % kChunks;
    int c[3], x[3];
    tile_coord(row, l2, c);
    bool valid = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      x[a] = origin[a] + c[a];
      valid = valid && x[a] < limit[a];
    }
    if (valid)
      *reinterpret_cast<uint4*>(base + token_offset(x, dil, tok_stride) + chunk * kVec) =
          *reinterpret_cast<const uint4*>(smem + row * kPitch + chunk * kVec);
  }
}

// ------------------------------------------------------------------------------------------
// dQ kernel (kPrec: see Passes in sm80_frag.cuh; float32 only).
template <typename T, int D, int kPrec = 0>
__global__ void __launch_bounds__(kThreads, 2)
    fna_bwd_dq_kernel(const __grid_constant__ FnaBwdParams bp) {
  using F = Frag<T>;
  using Pass = Passes<kPrec>;
  const FnaFwdParams& p = bp.f;
  const SoftmaxUnits<T> units(p.scale_log2);  // P recomputed in the forward's units
  constexpr int kPitch = tile_pitch<T, D>();
  constexpr int kDTiles = D / 8;
  constexpr int kKChunks = D / 16;
  constexpr int kNTiles = kTileKV / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTileKV * kPitch;
  T* sK = sdO + kTileKV * kPitch;     // 2 stages
  T* sV = sK + 2 * kTileKV * kPitch;  // 2 stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  QTileWork tile;
  if (!tile.init(p)) {
    if (tile.padded) store_padded_q_tile<T, D>(p, bp.dq, nullptr, kThreads);
    return;
  }
  const int b = tile.b, h = tile.h;
  const Neighborhood& gi = tile.nb;
  const int(&q0)[3] = tile.q0;
  const int(&lo)[3] = tile.lo;
  const int(&hi)[3] = tile.hi;
  const int(&nbox)[3] = tile.nbox;
  const int total_boxes = tile.total;

  // Per warp: union and intersection of its 16 queries' windows (see the forward kernel).
  int wlo[3], whi[3], wilo[3], wihi[3];
  const bool warp_active =
      rows_windows(gi, q0, p.q_tile_log2, warp * 16, 16, wlo, whi, wilo, wihi);

  // This thread's two query rows: window (start, length), lse (base 2) and delta.
  int ws[2][3];
  unsigned wl[2][3];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int c[3], x[3];
    tile_coord(warp * 16 + lane / 4 + r * 8, p.q_tile_log2, c);
    bool valid = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      x[a] = q0[a] + c[a];
      valid = valid && x[a] < gi.glen[a];
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Interval w = gi.window(a, min(x[a], gi.glen[a] - 1));
      ws[r][a] = w.lo;
      wl[r][a] = valid ? static_cast<unsigned>(w.hi - w.lo) : 0u;  // empty: row masked
    }
    lse2[r] = 0.f;
    delta[r] = 0.f;
    if (valid) {
      int64_t off = b * p.lse_batch_stride + h;
#pragma unroll
      for (int a = 0; a < 3; ++a)
        off += static_cast<int64_t>(gi.g[a] + x[a] * gi.dil[a]) * p.lse_token_stride[a];
      lse2[r] = units.lse_units(p.lse[off]);
      delta[r] = bp.delta[off];
    }
  }

  const int hkv = tile.hkv;
  int64_t goff_q = 0, goff_kv = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(gi.g[a]) * p.kv_token_stride[a];
  }
  const int64_t qoff = b * p.q_batch_stride + goff_q + h * p.q_head_stride;
  const int64_t kvoff = b * p.kv_batch_stride + goff_kv + hkv * p.kv_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + kvoff;
  const T* vbase = static_cast<const T*>(p.v) + kvoff;

  {
    T* const dst[2] = {sQ, sdO};
    const T* const src[2] = {static_cast<const T*>(p.q) + qoff,
                             static_cast<const T*>(bp.dout) + qoff};
    load_tiles<T, D, 2>(dst, src, p.q_token_stride, gi.dil, q0, gi.glen, p.q_tile_log2, tid);
  }
  cp_async_commit();
  // Box origins: o_load the next box to load, o_cur the one computed on (odometer order).
  int o_load[3] = {lo[0], lo[1], lo[2]}, o_cur[3] = {lo[0], lo[1], lo[2]};
  auto load_kv = [&](int stage) {
    T* const dst[2] = {sK + stage * kTileKV * kPitch, sV + stage * kTileKV * kPitch};
    const T* const src[2] = {kbase, vbase};
    load_tiles<T, D, 2>(dst, src, p.kv_token_stride, gi.dil, o_load, hi, p.kv_tile_log2, tid);
    next_box(o_load, lo, nbox, p.kv_tile_log2);
  };
  load_kv(0);
  cp_async_commit();

  float acc[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int j = 0; j < total_boxes; ++j) {
    const int stage = j & 1;
    pipeline_step(j, total_boxes, [&](int, int st) { load_kv(st); });
    const T* k_s = sK + stage * kTileKV * kPitch;
    const T* v_s = sV + stage * kTileKV * kPitch;

    const int o[3] = {o_cur[0], o_cur[1], o_cur[2]};
    next_box(o_cur, lo, nbox, p.kv_tile_log2);
    bool touch, full_ax[3];
    classify_box(o, p.kv_tile_log2, wlo, whi, wilo, wihi, warp_active, touch, full_ax);
    const bool full = full_ax[0] && full_ax[1] && full_ax[2];
    if (touch) {
      // S = Q K^T and dP = dO V^T (16 x 64 per warp).
      float s[kNTiles][4], dp[kNTiles][4];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kc = 0; kc < kKChunks; ++kc) {
        uint32_t qa[F::kA], da[F::kA];
        F::load_a(qa, sQ, kPitch, warp * 16, kc * 16, lane);
        F::load_a(da, sdO, kPitch, warp * 16, kc * 16, lane);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t kb[F::kB], vb[F::kB];
          F::load_b(kb, k_s, kPitch, np * 16, kc * 16, lane);
          F::load_b(vb, v_s, kPitch, np * 16, kc * 16, lane);
          F::template mma<Pass::kScores>(s[2 * np], qa, kb, 0);
          F::template mma<Pass::kScores>(s[2 * np + 1], qa, kb, 1);
          F::template mma<Pass::kScores>(dp[2 * np], da, vb, 0);
          F::template mma<Pass::kScores>(dp[2 * np + 1], da, vb, 1);
        }
      }
      // P and dS = P * (dP - delta), masked outside the windows: one loop, instantiated for
      // three masks (the choice is uniform per box, so no branch inside the loop).
      auto p_ds = [&](auto in_window) {
#pragma unroll
        for (int n = 0; n < kNTiles; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              // exp first, then a select: a predicated MUFU, not a branch around it
              const float ev =
                  units.backward_exp(s[n][2 * r + e], lse2[r]);
              const float pv = in_window(n, r, e) ? ev : 0.f;
              dp[n][2 * r + e] = pv * (dp[n][2 * r + e] - delta[r]);
            }
      };
      auto in_axis = [&](int a, int r, int c) { return in_window(o[a] + c, ws[r][a], wl[r][a]); };
      if (full) {
        p_ds([](int, int, int) { return true; });
      } else if (p.kv_tile_log2[2] >= 3) {
        // A lane holds keys n * 8 + 2 * (lane % 4) + e; with 8 or more keys along the box's
        // innermost axis, their axes 0 and 1 depend on n alone (see the forward kernel).
        p_ds([&](int n, int r, int e) {
          int c[3];
          tile_coord(n * 8, p.kv_tile_log2, c);
          return in_axis(0, r, c[0]) & in_axis(1, r, c[1]) &
                 in_axis(2, r, c[2] + 2 * (lane % 4) + e);  // & (not &&): no branches
        });
      } else {
        p_ds([&](int n, int r, int e) {
          int c[3];
          tile_coord(n * 8 + 2 * (lane % 4) + e, p.kv_tile_log2, c);
          return in_axis(0, r, c[0]) & in_axis(1, r, c[1]) & in_axis(2, r, c[2]);
        });
      }
      // dQ += dS K.
#pragma unroll
      for (int kk = 0; kk < kTileKV / 16; ++kk) {
        uint32_t a[F::kA];
        F::pack_a(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < kDTiles / 2; ++dn) {
          uint32_t kb[F::kB];
          F::load_bt(kb, k_s, kPitch, kk * 16, dn * 16, lane);
          F::template mma<Pass::kOther>(acc[2 * dn], a, kb, 0);
          F::template mma<Pass::kOther>(acc[2 * dn + 1], a, kb, 1);
        }
      }
    }
    __syncthreads();
  }

  // dQ = scale * acc, staged through sQ.
  const float scale = p.scale_log2 / kLog2e;
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int row = warp * 16 + lane / 4 + r * 8;
      F::store2(sQ + row * kPitch + d * 8 + 2 * (lane % 4), acc[d][2 * r] * scale,
                acc[d][2 * r + 1] * scale);
    }
  __syncthreads();
  int span[3];
  group_span(p, gi, span);
  store_tile<T, D>(static_cast<T*>(bp.dq) + qoff, sQ, p.q_token_stride, gi.dil, q0, span,
                   p.q_tile_log2, tid);
}

// ------------------------------------------------------------------------------------------
// dK / dV kernel.

template <int D>
__host__ __device__ constexpr int dkdv_step_q() {
  return D > 64 ? 32 : 64;  // queries per step: S^T, dP^T and both accumulators in registers
}

template <typename T, int D, int kPrec = 0>
__global__ void __launch_bounds__(kThreads, 2)
    fna_bwd_dkdv_kernel(const __grid_constant__ FnaBwdParams bp) {
  using F = Frag<T>;
  using Pass = Passes<kPrec>;
  const FnaFwdParams& p = bp.f;
  const SoftmaxUnits<T> units(p.scale_log2);  // P recomputed in the forward's units
  constexpr int kPitch = tile_pitch<T, D>();
  constexpr int kDTiles = D / 8;
  constexpr int kKChunks = D / 16;
  constexpr int kStepQ = dkdv_step_q<D>();
  constexpr int kNTiles = kStepQ / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTileKV * kPitch;
  T* sQ = sV + kTileKV * kPitch;      // 2 stages
  T* sdO = sQ + 2 * kTileKV * kPitch;  // 2 stages
  int* sWin = reinterpret_cast<int*>(sdO + 2 * kTileKV * kPitch);  // 2 x [64][6]
  float* sLse = reinterpret_cast<float*>(sWin + 2 * kTileKV * 6);   // 2 x [64]
  float* sDelta = sLse + 2 * kTileKV;                               // 2 x [64]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b = blockIdx.z;
  int hkv;
  const int group = divmod(static_cast<int>(blockIdx.y), p.heads_kv, hkv);
  int ext[3];
  sample_extents(p, b, ext);
  const Neighborhood gi(ext, p.kernel, p.stride, p.dilation, p.causal, group);
  const int group_heads = p.heads_per_kv;
  int k0[3], k1[3];
  tile_origin(blockIdx.x, bp.num_kv_tiles, p.kv_tile_log2, k0);
  if (k0[0] >= gi.glen[0] || k0[1] >= gi.glen[1] || k0[2] >= gi.glen[2]) {
    // Past the sample's group: a tile inside the tensor's (ragged batch) stores zero gradients.
    if (p.valid_extent != nullptr)
      store_padded_kv_tile<T, D>(bp, kThreads);
    return;
  }
#pragma unroll
  for (int a = 0; a < 3; ++a) k1[a] = gi.tile_last(a, k0[a], p.kv_tile_log2[a]) + 1;

  // Inverse neighborhood per axis (the queries whose windows meet keys [k0, k1)), covered by Q
  // boxes from ilo.
  int ilo[3], nq[3];
  int boxes = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const Interval inv = gi.inverse(a, k0[a], k1[a] - 1);
    ilo[a] = inv.lo;
    nq[a] = inv.hi > inv.lo ? tiles_covering(inv.hi - inv.lo, p.q_tile_log2[a]) : 0;
    boxes *= nq[a];
  }
  const int total = boxes * group_heads;

  // This thread's two key rows (in-group coordinates).
  int kc[2][3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int c[3];
    tile_coord(warp * 16 + lane / 4 + r * 8, p.kv_tile_log2, c);
#pragma unroll
    for (int a = 0; a < 3; ++a) kc[r][a] = k0[a] + c[a];
  }

  int64_t goff_q = 0, goff_kv = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(gi.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(gi.g[a]) * p.kv_token_stride[a];
  }
  const int64_t kvoff = b * p.kv_batch_stride + goff_kv + hkv * p.kv_head_stride;
  {
    T* const dst[2] = {sK, sV};
    const T* const src[2] = {static_cast<const T*>(p.k) + kvoff,
                             static_cast<const T*>(p.v) + kvoff};
    load_tiles<T, D, 2>(dst, src, p.kv_token_stride, gi.dil, k0, gi.glen, p.kv_tile_log2, tid);
  }
  cp_async_commit();

  // The next (head, Q box) to load: boxes in row-major order per head of the group, advanced
  // like an odometer (no division per step).
  int qh = hkv * group_heads, qo[3] = {ilo[0], ilo[1], ilo[2]};
  // Q and dO rows by cp.async; each query row's window, lse (base 2) and delta by plain loads.
  auto load_q = [&](int stage) {
    const int h = qh, o[3] = {qo[0], qo[1], qo[2]};
    next_box(qo, ilo, nq, p.q_tile_log2);
    if (qo[0] >= ilo[0] + (nq[0] << p.q_tile_log2[0])) {  // past the last box: next head
      qo[0] = ilo[0];
      ++qh;
    }
    const int64_t qoff = b * p.q_batch_stride + goff_q + h * p.q_head_stride;
    T* const dst[2] = {sQ + stage * kTileKV * kPitch, sdO + stage * kTileKV * kPitch};
    const T* const src[2] = {static_cast<const T*>(p.q) + qoff,
                             static_cast<const T*>(bp.dout) + qoff};
    load_tiles<T, D, 2>(dst, src, p.q_token_stride, gi.dil, o, gi.glen, p.q_tile_log2, tid);
    for (int row = tid; row < kTileKV; row += kThreads) {
      int c[3], x[3];
      tile_coord(row, p.q_tile_log2, c);
      bool valid = true;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        x[a] = o[a] + c[a];
        valid = valid && x[a] < gi.glen[a];
      }
      int* w = sWin + (stage * kTileKV + row) * 6;
      float l2 = 0.f, dl = 0.f;
      if (valid) {
        int64_t off = b * p.lse_batch_stride + h;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          const Interval win = gi.window(a, x[a]);
          w[2 * a] = win.lo;
          w[2 * a + 1] = win.hi - win.lo;
          off += static_cast<int64_t>(gi.g[a] + x[a] * gi.dil[a]) * p.lse_token_stride[a];
        }
        l2 = units.lse_units(p.lse[off]);
        dl = bp.delta[off];
      } else {
#pragma unroll
        for (int a = 0; a < 3; ++a) w[2 * a] = w[2 * a + 1] = 0;  // empty window: masked
      }
      sLse[stage * kTileKV + row] = l2;
      sDelta[stage * kTileKV + row] = dl;
    }
  };

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  if (total > 0) {
    load_q(0);
    cp_async_commit();
  }
  for (int t = 0; t < total; ++t) {
    const int stage = t & 1;
    pipeline_step(t, total, [&](int, int st) { load_q(st); });
    const T* q_s = sQ + stage * kTileKV * kPitch;
    const T* do_s = sdO + stage * kTileKV * kPitch;
    const int* win = sWin + stage * kTileKV * 6;
    const float* lse_s = sLse + stage * kTileKV;
    const float* dl_s = sDelta + stage * kTileKV;

#pragma unroll 1
    for (int q0 = 0; q0 < kTileKV; q0 += kStepQ) {
      // S^T = K Q^T and dP^T = V dO^T (16 keys x kStepQ queries per warp).
      float s[kNTiles][4], dp[kNTiles][4];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kc2 = 0; kc2 < kKChunks; ++kc2) {
        uint32_t ka[F::kA], va[F::kA];
        F::load_a(ka, sK, kPitch, warp * 16, kc2 * 16, lane);
        F::load_a(va, sV, kPitch, warp * 16, kc2 * 16, lane);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t qb[F::kB], db[F::kB];
          F::load_b(qb, q_s, kPitch, q0 + np * 16, kc2 * 16, lane);
          F::load_b(db, do_s, kPitch, q0 + np * 16, kc2 * 16, lane);
          F::template mma<Pass::kScores>(s[2 * np], ka, qb, 0);
          F::template mma<Pass::kScores>(s[2 * np + 1], ka, qb, 1);
          F::template mma<Pass::kScores>(dp[2 * np], va, db, 0);
          F::template mma<Pass::kScores>(dp[2 * np + 1], va, db, 1);
        }
      }
      // P^T (masked) and dS^T = P^T * (dP^T - delta).
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = q0 + n * 8 + 2 * (lane % 4) + e;
          const int* w = win + col * 6;
          const float l2 = lse_s[col], dl = dl_s[col];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            // & (not &&) and exp before the select: predicated code, no branch per element
            const bool in = in_window(kc[r][0], w[0], w[1]) & in_window(kc[r][1], w[2], w[3]) &
                            in_window(kc[r][2], w[4], w[5]);
            const float ev = units.backward_exp(s[n][2 * r + e], l2);
            const float pv = in ? ev : 0.f;
            s[n][2 * r + e] = pv;
            dp[n][2 * r + e] = pv * (dp[n][2 * r + e] - dl);
          }
        }
      }
      // dV += P^T dO and dK += dS^T Q (k dim = queries).
#pragma unroll
      for (int kk = 0; kk < kStepQ / 16; ++kk) {
        uint32_t pa[F::kA], sa[F::kA];
        F::pack_a(pa, s[2 * kk], s[2 * kk + 1]);
        F::pack_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < kDTiles / 2; ++dn) {
          uint32_t db[F::kB], qb[F::kB];
          F::load_bt(db, do_s, kPitch, q0 + kk * 16, dn * 16, lane);
          F::load_bt(qb, q_s, kPitch, q0 + kk * 16, dn * 16, lane);
          F::template mma<Pass::kOther>(acc_dv[2 * dn], pa, db, 0);
          F::template mma<Pass::kOther>(acc_dv[2 * dn + 1], pa, db, 1);
          F::template mma<Pass::kOther>(acc_dk[2 * dn], sa, qb, 0);
          F::template mma<Pass::kOther>(acc_dk[2 * dn + 1], sa, qb, 1);
        }
      }
    }
    __syncthreads();
  }
  if (total == 0) {
    cp_async_wait<0>();
    __syncthreads();
  }

  // dK = scale * acc_dk, dV = acc_dv, staged through the (now free) Q / dO buffers.
  const float scale = p.scale_log2 / kLog2e;
#pragma unroll
  for (int d = 0; d < kDTiles; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int off = (warp * 16 + lane / 4 + r * 8) * kPitch + d * 8 + 2 * (lane % 4);
      F::store2(sQ + off, acc_dk[d][2 * r] * scale, acc_dk[d][2 * r + 1] * scale);
      F::store2(sdO + off, acc_dv[d][2 * r], acc_dv[d][2 * r + 1]);
    }
  __syncthreads();
  int span[3];  // rows stored: the tensor's group (zeros past the sample's: P = 0 there)
  group_span(p, gi, span);
  store_tile<T, D>(static_cast<T*>(bp.dk) + kvoff, sQ, p.kv_token_stride, gi.dil, k0, span,
                   p.kv_tile_log2, tid);
  store_tile<T, D>(static_cast<T*>(bp.dv) + kvoff, sdO, p.kv_token_stride, gi.dil, k0, span,
                   p.kv_tile_log2, tid);
}

template <typename T, int D, int kPrec = 0>
cudaError_t launch_backward(const FnaBwdParams& bp, cudaStream_t stream) {
  const FnaFwdParams& p = bp.f;
  constexpr int kPitchBytes = tile_pitch<T, D>() * static_cast<int>(sizeof(T));
  constexpr int kDqBytes = 6 * kTileKV * kPitchBytes;
  constexpr int kDkvBytes = kDqBytes + 2 * kTileKV * (6 * static_cast<int>(sizeof(int)) + 2 * 4);
  cudaError_t err = launch_kernel(fna_bwd_dq_kernel<T, D, kPrec>, q_tile_grid(p), kThreads,
                                  kDqBytes, false, bp, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(bp.num_kv_tiles[0] * bp.num_kv_tiles[1] * bp.num_kv_tiles[2],
                  p.heads_kv * p.dilation[0] * p.dilation[1] * p.dilation[2], p.batch);
  return launch_kernel(fna_bwd_dkdv_kernel<T, D, kPrec>, grid, kThreads, kDkvBytes, false, bp,
                       stream);
}

}  // namespace sm80
}  // namespace fna
}  // namespace natten_jax
