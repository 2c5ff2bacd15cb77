// GEMM-based NN and IN: out[rows, 64 features] = sum over the column box of P . M, where P is
// the dense (rows x box) matrix of attention weights (zero off the neighborhood) and M the box
// tokens' features.
//
//   NN (kInverse = false): rows are queries, columns their window box (keys); P[x, y] =
//       w[x, h, j(x, y)], M = values (head h / G).
//   IN (kInverse = true): rows are keys, columns the queries whose windows hold them; P[y, x] =
//       w[x, h, j(x, y)], M = bm[x, h] (h = hk * G + g, summed over the G query heads).
//
// Each 64-column chunk of the box: the M rows go to shared memory; each warp builds its P
// fragments straight in registers (one neighbor test and one weight load per element; fp32
// stages P in shared memory instead) and accumulates P . M on tensor cores (FFMA for fp32).
#pragma once

#include <type_traits>

#include "natten_jax/unfused/gemm_tile.cuh"
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/warp_mma.cuh"

namespace natten_jax {
namespace unfused {
namespace gemm {

template <typename T>
constexpr int wsum_pitch() {
  return kOutCols + (std::is_same<T, float>::value ? 4 : 8);
}
constexpr int kPPitch = kCols + 4;  // fp32 staging of P, per warp 16 x kCols

template <typename T>
constexpr size_t wsum_smem_bytes() {
  return 2 * kRows * sizeof(Entry) + size_t(kCols) * wsum_pitch<T>() * sizeof(T) +
         (std::is_same<T, float>::value ? size_t(4) * 16 * kPPitch * sizeof(float) : 0);
}

// Weight of the (row, col) element of P, as raw bits (16-bit types) or a float; 0 off the
// neighborhood.
template <typename T, bool kInverse>
__device__ __forceinline__ float weight_value(const UnfusedParams& p, const T* wb, int H, int hw,
                                              const Entry& row, const Entry& col) {
  const Entry& q = kInverse ? col : row;
  const Entry& k = kInverse ? row : col;
  if (q.tok < 0 || k.tok < 0) return 0.f;
  const int j = neighbor_j(p, q.start, q.len, k.i);
  if (j < 0) return 0.f;
  return to_float(wb[(int64_t(q.tok) * H + hw) * p.window + j]);
}

template <typename T, bool kInverse>
__device__ __forceinline__ uint32_t weight_bits(const UnfusedParams& p, const T* wb, int H, int hw,
                                                const Entry& row, const Entry& col) {
  const Entry& q = kInverse ? col : row;
  const Entry& k = kInverse ? row : col;
  if (q.tok < 0 || k.tok < 0) return 0u;
  const int j = neighbor_j(p, q.start, q.len, k.i);
  if (j < 0) return 0u;
  return load_bits16(wb + (int64_t(q.tok) * H + hw) * p.window + j);
}

template <typename T, bool kInverse>
__global__ void __launch_bounds__(kThreads)
    gemm_weighted_sum_kernel(const __grid_constant__ GemmParams gp) {
  constexpr bool kMma = !std::is_same<T, float>::value;
  constexpr int kPitch = wsum_pitch<T>();
  const UnfusedParams& p = gp.p;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Entry* s_rows = reinterpret_cast<Entry*>(smem_raw);
  Entry* s_cols = s_rows + kRows;
  T* sM = reinterpret_cast<T*>(s_cols + kCols);
  float* sP = reinterpret_cast<float*>(sM + kCols * kPitch);  // fp32 only

  Cta c;
  if (!decode_cta(gp, !kInverse, c)) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int T_ = num_tokens(p);
  const int H = p.heads, Hkv = p.heads_kv, C = p.dim;
  const int G = H / Hkv;
  const int col0 = c.cb * kOutCols;
  const int nvalid = min(kOutCols, C - col0);    // output features of this CTA
  const int ntiles = (nvalid + 7) / 8;           // 8-feature MMA tiles with any of them
  const bool vec_ok = C % (16 / sizeof(T)) == 0;
  const int Hm = kInverse ? H : Hkv;             // heads of the M operand
  const T* wb = static_cast<const T*>(p.a) + int64_t(c.b) * T_ * H * p.window;

  if (tid < kRows) row_entry(gp, c, tid, s_rows[tid]);
  __syncthreads();
  const WarpCols wc = warp_columns(gp, c, !kInverse, warp);
  const int lr0 = warp * 16 + lane / 4;
  const Entry r0 = s_rows[lr0], r1 = s_rows[lr0 + 8];

  float acc[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  for (int n0 = 0; n0 < c.nbox; n0 += kCols) {
    __syncthreads();  // the previous chunk's readers are done
    if (tid < kCols) col_entry(gp, c, n0 + tid, s_cols[tid]);
    __syncthreads();
    const unsigned gmask = wc.active ? group_mask(wc, s_cols, lane) : 0u;
    for (int g = 0; g < (kInverse ? G : 1); ++g) {
      const int hw = kInverse ? c.head * G + g : c.head;      // weights' head
      const int hm = kInverse ? c.head * G + g : c.head / G;  // M operand's head
      if (g > 0) __syncthreads();  // sM readers of the previous head are done
      load_rows(sM, kPitch, s_cols, kCols,
                static_cast<const T*>(p.bm) + (int64_t(c.b) * T_ * Hm + hm) * C + col0,
                int64_t(Hm) * C, nvalid, kOutCols, vec_ok, tid);
      __syncthreads();
      if (gmask == 0u) continue;

      if constexpr (kMma) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (!((gmask >> (2 * kk)) & 3u)) continue;
          const int cb = kk * 16 + 2 * (lane % 4);
          const Entry& c0 = s_cols[cb];
          const Entry& c1 = s_cols[cb + 1];
          const Entry& c8 = s_cols[cb + 8];
          const Entry& c9 = s_cols[cb + 9];
          uint32_t af[4];
          af[0] = pack_bits16(weight_bits<T, kInverse>(p, wb, H, hw, r0, c0),
                              weight_bits<T, kInverse>(p, wb, H, hw, r0, c1));
          af[1] = pack_bits16(weight_bits<T, kInverse>(p, wb, H, hw, r1, c0),
                              weight_bits<T, kInverse>(p, wb, H, hw, r1, c1));
          af[2] = pack_bits16(weight_bits<T, kInverse>(p, wb, H, hw, r0, c8),
                              weight_bits<T, kInverse>(p, wb, H, hw, r0, c9));
          af[3] = pack_bits16(weight_bits<T, kInverse>(p, wb, H, hw, r1, c8),
                              weight_bits<T, kInverse>(p, wb, H, hw, r1, c9));
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            if (np * 16 >= nvalid) continue;
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, sM + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kPitch +
                                  np * 16 + 8 * (lane / 16));
            WarpMma<T>::mma(acc[2 * np], af, bf[0], bf[1]);
            WarpMma<T>::mma(acc[2 * np + 1], af, bf[2], bf[3]);
          }
        }
      } else {
        float* P = sP + warp * 16 * kPPitch;
        const float* M = reinterpret_cast<const float*>(sM);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (!((gmask >> q) & 1u)) continue;
          const Entry& col = s_cols[q * 8 + lane % 8];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rr = lane / 8 + 4 * e;
            P[rr * kPPitch + q * 8 + lane % 8] =
                weight_value<T, kInverse>(p, wb, H, hw, s_rows[warp * 16 + rr], col);
          }
        }
        __syncwarp();
        const float* P0 = P + (lane / 4) * kPPitch;
        const float* P1 = P0 + 8 * kPPitch;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (!((gmask >> q) & 1u)) continue;
#pragma unroll 4
          for (int kq = 0; kq < 8; ++kq) {
            const int k = q * 8 + kq;
            const float a0 = P0[k], a1 = P1[k];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              if (nt >= ntiles) continue;
              const float2 bv =
                  *reinterpret_cast<const float2*>(M + k * kPitch + nt * 8 + 2 * (lane % 4));
              acc[nt][0] += a0 * bv.x;
              acc[nt][1] += a0 * bv.y;
              acc[nt][2] += a1 * bv.x;
              acc[nt][3] += a1 * bv.y;
            }
          }
        }
        __syncwarp();  // P is rebuilt by the next head / chunk
      }
    }
  }

  // Epilogue: rows r0 (acc[.][0..1]) and r1 (acc[.][2..3]), features col0 + 8 nt + 2 (lane % 4).
  const int Hout = kInverse ? Hkv : H;
  T* out = static_cast<T*>(p.out) + (int64_t(c.b) * T_ * Hout + c.head) * C + col0;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    if (nt >= ntiles) continue;
    const int f = nt * 8 + 2 * (lane % 4);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const Entry& r = rr == 0 ? r0 : r1;
      if (r.tok < 0) continue;
      T* o = out + int64_t(r.tok) * Hout * C;
      if (f < nvalid) o[f] = from_float<T>(acc[nt][2 * rr] * p.scale);
      if (f + 1 < nvalid) o[f + 1] = from_float<T>(acc[nt][2 * rr + 1] * p.scale);
    }
  }
}

// Host launch of the NN (kInverse = false) or IN (true) kernel.
template <typename T, bool kInverse>
cudaError_t launch_weighted_sum(const UnfusedParams& p, cudaStream_t stream) {
  GemmParams gp{};
  gp.p = p;
  gp.col_blocks = (p.dim + kOutCols - 1) / kOutCols;
  gp.dim_padded = p.dim;
  const dim3 grid = tile_grid(gp, kInverse ? p.heads_kv : p.heads);
  if (grid.x == 0) return cudaErrorNotSupported;
  const size_t smem = wsum_smem_bytes<T>();
  if (smem > static_cast<size_t>(max_dynamic_smem())) return cudaErrorNotSupported;
  cudaError_t err = cudaFuncSetAttribute(gemm_weighted_sum_kernel<T, kInverse>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  gemm_weighted_sum_kernel<T, kInverse><<<grid, kThreads, smem, stream>>>(gp);
  return cudaGetLastError();
}

// The NN (kInverse = false) or IN (true) kernel for `dtype`.
template <bool kInverse>
cudaError_t weighted_sum(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    return launch_weighted_sum<decltype(t), kInverse>(p, stream);
  });
}

}  // namespace gemm
}  // namespace unfused
}  // namespace natten_jax
