// Fused neighborhood attention forward, tensor-core path (mma.sync, cp.async; fp16 / bf16 with
// m16n8k16 and ldmatrix, float32 with TF32 m16n8k8: sm80_frag.cuh): runs on sm_80 and later.
//
// One CTA of 4 warps computes one Q tile of 64 * MT queries (a multi-dimensional box of
// 2^a x 2^b x 2^c tokens of one dilation group) for one (batch, head); each warp owns 16 * MT
// query rows (MT m16 tiles), so each K/V fragment read from shared memory feeds MT MMAs. It
// visits the union of its queries' windows as a sequence of KV boxes (64 keys, also
// multi-dimensional) that start at the union's corner rather than on a fixed grid,
// double-buffered in shared memory. The fine-grained
// neighborhood mask is applied only to boxes that are not inside every query's window. Online
// softmax in fp32 (base 2); the output and the natural-log logsumexp are written at the end.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm80_common.cuh"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {
namespace sm80 {

// CTAs per SM the register budget aims at: small head dims are latency-bound, so more of them
// (float32: twice the operand registers, so fewer).
template <typename T, int D, int MT>
__host__ __device__ constexpr int min_ctas_per_sm() {
  if (sizeof(T) == 4) return D <= 64 ? 2 : 1;
  return MT > 1 ? (D <= 64 ? 2 : 1) : (D <= 32 ? 4 : (D <= 64 ? 3 : 2));
}

// Q fragments stay in registers unless that would crowd out the accumulators.
template <typename T, int D, int MT>
__host__ __device__ constexpr bool q_in_registers() {
  return MT * D * static_cast<int>(sizeof(T)) <= 256;
}

// MinCtas: the CTAs per SM the register budget aims at (registers <= 64K / (128 MinCtas)).
// kPrec (float32 only): see Passes (sm80_frag.cuh).
template <typename T, int D, int MT, int MinCtas = min_ctas_per_sm<T, D, MT>(), int kPrec = 0>
__global__ void __launch_bounds__(kThreads, MinCtas)
    fna_fwd_kernel(const __grid_constant__ FnaFwdParams p) {
  using F = Frag<T>;
  using Pass = Passes<kPrec>;
  constexpr int kTileQ = 64 * MT;
  constexpr int kWarpRows = 16 * MT;
  constexpr int kPitch = tile_pitch<T, D>();  // 16-byte pad per row: conflict-free fragments
  constexpr int kDTiles = D / 8;
  constexpr int kKChunks = D / 16;
  // Keys per softmax step: a KV box in one step, or in two halves where S would crowd out the
  // output accumulators (MT * D > 128).
  constexpr int kStepN = (MT * D > 128) ? kTileKV / 2 : kTileKV;
  constexpr int kNTiles = kStepN / 8;
  constexpr bool kQRegs = q_in_registers<T, D, MT>();

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTileQ * kPitch;       // 2 stages
  T* sV = sK + 2 * kTileKV * kPitch;  // 2 stages
  int* sWin = reinterpret_cast<int*>(sV + 2 * kTileKV * kPitch);  // [kTileQ][3][2]: ws, len

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // ---- Which (batch, head, dilation group, Q tile) this CTA owns; its KV range [lo, hi).
  QTileWork tile;
  if (!tile.init(p)) {
    if (tile.padded) store_padded_q_tile<T, D>(p, p.o, p.lse, kThreads);
    return;
  }
  const int b = tile.b, h = tile.h;
  const Neighborhood& nb = tile.nb;
  const int(&q0)[3] = tile.q0;
  const int(&lo)[3] = tile.lo;
  const int(&hi)[3] = tile.hi;
  const int(&nbox)[3] = tile.nbox;
  const int total_boxes = tile.total;

  // ---- Per warp: its rows form a sub-box of the Q tile (tile extents are powers of two).
  // A KV box outside the union [wlo, whi) of the warp's windows is skipped by the warp; one
  // inside their intersection [wilo, wihi) needs no mask. Rows past the group's extent take the
  // window of the last valid row (computed, never stored).
  int wlo[3], whi[3], wilo[3], wihi[3];
  const bool warp_active =
      rows_windows(nb, q0, p.q_tile_log2, warp * kWarpRows, kWarpRows, wlo, whi, wilo, wihi);

  // ---- Every query row's window (start, length) per axis, in shared memory for the mask.
  for (int row = tid; row < kTileQ; row += kThreads) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Interval w = row_window(nb, q0, p.q_tile_log2, row, a);
      sWin[row * 6 + 2 * a] = w.lo;
      sWin[row * 6 + 2 * a + 1] = w.hi - w.lo;
    }
  }

  const int hkv = tile.hkv;
  int64_t goff_q = 0, goff_kv = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    goff_q += static_cast<int64_t>(nb.g[a]) * p.q_token_stride[a];
    goff_kv += static_cast<int64_t>(nb.g[a]) * p.kv_token_stride[a];
  }
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_batch_stride + goff_q + h * p.q_head_stride;
  const T* kbase =
      static_cast<const T*>(p.k) + b * p.kv_batch_stride + goff_kv + hkv * p.kv_head_stride;
  const T* vbase =
      static_cast<const T*>(p.v) + b * p.kv_batch_stride + goff_kv + hkv * p.kv_head_stride;

  // ---- Prologue: Q tile, first KV box.
  
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    // Rows [64m, 64m + 64) of the Q tile: origin shifted by tile_coord(64m).
    int cm[3], om[3];
    tile_coord(m * kTileKV, p.q_tile_log2, cm);
    int l2[3] = {p.q_tile_log2[0], p.q_tile_log2[1], p.q_tile_log2[2]};
    // A 64-row slice of a 2^7-row tile is a 2^6-row sub-box: drop one bit from the outermost
    // axis that has one (row-major order).
    if (MT > 1) {
      int a = (l2[0] > 0) ? 0 : ((l2[1] > 0) ? 1 : 2);
      l2[a] -= 1;
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) om[a] = q0[a] + cm[a];
    T* const dst[1] = {sQ + m * kTileKV * kPitch};
    const T* const src[1] = {qbase};
    load_tiles<T, D, 1>(dst, src, p.q_token_stride, nb.dil, om, nb.glen, l2, tid);
  }
  cp_async_commit();

  // Box origins in row-major box order, advanced like an odometer (no division per box):
  // o_load is the next box to load, o_cur the one computed on.
  int o_load[3] = {lo[0], lo[1], lo[2]}, o_cur[3] = {lo[0], lo[1], lo[2]};
  auto load_kv = [&](int stage) {  // the box at o_load, then o_load moves on
    T* const dst[2] = {sK + stage * kTileKV * kPitch, sV + stage * kTileKV * kPitch};
    const T* const src[2] = {kbase, vbase};
    load_tiles<T, D, 2>(dst, src, p.kv_token_stride, nb.dil, o_load, hi, p.kv_tile_log2, tid);
    next_box(o_load, lo, nbox, p.kv_tile_log2);
  };
  load_kv(0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  // A-operand fragment of m-tile m, k-chunk kc from shared memory.
  auto load_q = [&](uint32_t* f, int m, int kc) {
    F::load_a(f, sQ, kPitch, warp * kWarpRows + m * 16, kc * 16, lane);
  };
  uint32_t qf[kQRegs ? MT : 1][kQRegs ? kKChunks : 1][F::kA];
  if constexpr (kQRegs) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int kc = 0; kc < kKChunks; ++kc) load_q(qf[m][kc], m, kc);
  }

  float acc_o[MT][kDTiles][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < kDTiles; ++i)
      acc_o[m][i][0] = acc_o[m][i][1] = acc_o[m][i][2] = acc_o[m][i][3] = 0.f;
  const SoftmaxUnits<T> units(p.scale_log2);  // online softmax in these units (sm80_frag.cuh)
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

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
#pragma unroll 1
     for (int n0 = 0; n0 < kTileKV; n0 += kStepN) {
      // S = Q K^T (16 MT x kStepN per warp); each K fragment feeds MT MMAs.
      float s[MT][kNTiles][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < kKChunks; ++kc) {
        uint32_t qt[MT][F::kA];
        if constexpr (!kQRegs) {
#pragma unroll
          for (int m = 0; m < MT; ++m) load_q(qt[m], m, kc);
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t kb[F::kB];
          F::load_b(kb, k_s, kPitch, n0 + np * 16, kc * 16, lane);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const uint32_t* a = kQRegs ? qf[kQRegs ? m : 0][kQRegs ? kc : 0] : qt[m];
            F::template mma<Pass::kScores>(s[m][2 * np], a, kb, 0);
            F::template mma<Pass::kScores>(s[m][2 * np + 1], a, kb, 1);
          }
        }
      }

      // Fine-grained mask where the box is not inside every window of the warp's queries:
      // key c is a neighbor of row r iff (unsigned)(o + c - ws) < len on every axis. A lane
      // holds keys n * 8 + 2 * (lane % 4) + e; when the box's innermost axis spans 8 keys or
      // more, axes 0 and 1 of those 8 keys depend on n alone: tested once per n.
      if (!full && p.kv_tile_log2[2] >= 3) {
        const int j0 = 2 * (lane % 4);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int* w = sWin + (warp * kWarpRows + m * 16 + lane / 4 + r * 8) * 6;
            int rel0 = o[0] - w[0], rel1 = o[1] - w[2], rel2 = o[2] - w[4] + j0;
            unsigned len0 = w[1], len1 = w[3], len2 = w[5];
#pragma unroll
            for (int n = 0; n < kNTiles; ++n) {
              int c[3];
              tile_coord(n0 + n * 8, p.kv_tile_log2, c);
              bool in01 = offset_in_window(rel0 + c[0], len0) &&
                          offset_in_window(rel1 + c[1], len1);
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                bool in = in01 && offset_in_window(rel2 + c[2] + e, len2);
                if (!in) s[m][n][r * 2 + e] = -INFINITY;
              }
            }
          }
        }
      } else if (!full) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int* w = sWin + (warp * kWarpRows + m * 16 + lane / 4 + r * 8) * 6;
            int rel0 = o[0] - w[0], rel1 = o[1] - w[2], rel2 = o[2] - w[4];
            unsigned len0 = w[1], len1 = w[3], len2 = w[5];
#pragma unroll
            for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                int c[3];
                tile_coord(n0 + n * 8 + 2 * (lane % 4) + e, p.kv_tile_log2, c);
                bool in = offset_in_window(rel0 + c[0], len0) &&
                          offset_in_window(rel1 + c[1], len1) &&
                          offset_in_window(rel2 + c[2], len2);
                if (!in) s[m][n][r * 2 + e] = -INFINITY;
              }
            }
          }
        }
      }

      // Online softmax (base 2 for 16-bit inputs; SoftmaxUnits); the scale (> 0) is folded in.
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < kNTiles; ++n)
            mx = fmaxf(mx, fmaxf(s[m][n][2 * r], s[m][n][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
          float m_new = fmaxf(row_max[m][r], units.logit(mx));
          float m_use = (m_new == -INFINITY) ? 0.f : m_new;
          float alpha = units.exp_diff(row_max[m][r], m_use);
          row_max[m][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            s[m][n][2 * r] = units.exp_of(s[m][n][2 * r], m_use);
            s[m][n][2 * r + 1] = units.exp_of(s[m][n][2 * r + 1], m_use);
            sum += s[m][n][2 * r] + s[m][n][2 * r + 1];
          }
          row_sum[m][r] = row_sum[m][r] * alpha + sum;
#pragma unroll
          for (int d = 0; d < kDTiles; ++d) {
            acc_o[m][d][2 * r] *= alpha;
            acc_o[m][d][2 * r + 1] *= alpha;
          }
        }
      }

      // O += P V; each V fragment feeds MT MMAs.
#pragma unroll
      for (int kk = 0; kk < kStepN / 16; ++kk) {
        uint32_t pa[MT][F::kA];
#pragma unroll
        for (int m = 0; m < MT; ++m) F::pack_a(pa[m], s[m][2 * kk], s[m][2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          uint32_t vb[F::kB];
          F::load_bt(vb, v_s, kPitch, n0 + kk * 16, dp * 16, lane);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            F::template mma<Pass::kOther>(acc_o[m][2 * dp], pa[m], vb, 0);
            F::template mma<Pass::kOther>(acc_o[m][2 * dp + 1], pa[m], vb, 1);
          }
        }
      }
     }  // n0
    }  // touch
    __syncthreads();
  }

  // ---- Epilogue: normalise, stage O through shared memory, write 16-byte rows (those inside
  // the tensor: span; recomputed here, not held through the main loop).
  int span[3];
  group_span(p, nb, span);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[m][r];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      int row = warp * kWarpRows + m * 16 + lane / 4 + r * 8;
      // false: a padded query of a ragged batch (O = 0); without one, rows past the sample are
      // past the tensor too (never stored)
      const bool inside = p.valid_extent == nullptr || tile.row_inside(row);
      float inv = inside && l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        int col = d * 8 + 2 * (lane % 4);
        F::store2(sQ + row * kPitch + col, acc_o[m][d][2 * r] * inv,
                  acc_o[m][d][2 * r + 1] * inv);
      }
      if (lane % 4 == 0) {
        int c[3];
        tile_coord(row, p.q_tile_log2, c);
        bool valid = true;
        int64_t off = b * p.lse_batch_stride + h;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          int x = q0[a] + c[a];
          valid = valid && x < span[a];
          off += static_cast<int64_t>(nb.g[a] + x * nb.dil[a]) * p.lse_token_stride[a];
        }
        if (valid)
          p.lse[off] = !inside ? 0.f
                       : l > 0.f ? units.lse(row_max[m][r], l)
                                 : -INFINITY;
      }
    }
  }
  __syncthreads();
  T* obase = static_cast<T*>(p.o) + b * p.q_batch_stride + goff_q + h * p.q_head_stride;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  constexpr int kChunks = D / kVec;
#pragma unroll
  for (int i = 0; i < (kTileQ * kChunks) / kThreads; ++i) {
    int idx = tid + i * kThreads;
    int row = idx / kChunks, chunk = idx % kChunks;
    int c[3];
    tile_coord(row, p.q_tile_log2, c);
    bool valid = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      int x = q0[a] + c[a];
      valid = valid && x < span[a];
      off += static_cast<int64_t>(x) * nb.dil[a] * p.q_token_stride[a];
    }
    if (valid)
      *reinterpret_cast<uint4*>(obase + off + chunk * kVec) =
          *reinterpret_cast<const uint4*>(sQ + row * kPitch + chunk * kVec);
  }
}

template <typename T, int D, int MT>
constexpr int smem_bytes() {
  return (64 * MT + 4 * kTileKV) * tile_pitch<T, D>() * static_cast<int>(sizeof(T)) +
         64 * MT * 6 * static_cast<int>(sizeof(int));
}

// More CTAs per SM than the default (MinCtas variants) take all of the shared memory.
template <typename T, int D, int MT, int MinCtas = min_ctas_per_sm<T, D, MT>(), int kPrec = 0>
cudaError_t launch(const FnaFwdParams& p, cudaStream_t stream) {
  return launch_kernel(fna_fwd_kernel<T, D, MT, MinCtas, kPrec>, q_tile_grid(p), kThreads,
                       smem_bytes<T, D, MT>(), MinCtas != min_ctas_per_sm<T, D, MT>(), p,
                       stream);
}

}  // namespace sm80
}  // namespace fna
}  // namespace natten_jax
