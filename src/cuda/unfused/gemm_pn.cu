// GEMM-based PN: per row tile of 64 queries, S = Q_tile . K_chunk^T for each 64-key chunk of
// the tile's haloed key box (tensor cores: mma.sync m16n8k16 for fp16 / bf16; FFMA for fp32),
// then each S element that is a (query, neighbor) pair is written to its place in the
// [tokens, kernel volume] logits (+ RPB). With causal masking, the entries that are no neighbor
// get `fill` in a last pass.
#include <type_traits>

#include "natten_jax/unfused/gemm_tile.cuh"
#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/warp_mma.cuh"

namespace natten_jax {
namespace unfused {
namespace gemm {
namespace {

template <typename T>
constexpr int pn_pitch_pad() {
  return std::is_same<T, float>::value ? 4 : 8;  // keeps float4 / ldmatrix rows conflict-free
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_pn_kernel(const __grid_constant__ GemmParams gp) {
  constexpr bool kMma = !std::is_same<T, float>::value;
  const UnfusedParams& p = gp.p;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Entry* s_rows = reinterpret_cast<Entry*>(smem_raw);
  Entry* s_cols = s_rows + kRows;
  const int Cp = gp.dim_padded;
  const int pitch = Cp + pn_pitch_pad<T>();
  T* sA = reinterpret_cast<T*>(s_cols + kCols);
  T* sB = sA + kRows * pitch;

  Cta c;
  if (!decode_cta(gp, true, c)) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int T_ = num_tokens(p);
  const int H = p.heads, Hkv = p.heads_kv, C = p.dim, W = p.window;
  const int h = c.head;
  const bool vec_ok = C % (16 / sizeof(T)) == 0;

  if (tid < kRows) row_entry(gp, c, tid, s_rows[tid]);
  __syncthreads();
  load_rows(sA, pitch, s_rows, kRows, static_cast<const T*>(p.a) + (int64_t(c.b) * T_ * H + h) * C,
            int64_t(H) * C, C, Cp, vec_ok, tid);

  const WarpCols wc = warp_columns(gp, c, true, warp);
  const int lr0 = warp * 16 + lane / 4;
  const Entry q0 = s_rows[lr0], q1 = s_rows[lr0 + 8];
  T* out = static_cast<T*>(p.out) + int64_t(c.b) * T_ * H * W;
  const float* rpb = p.rpb != nullptr ? p.rpb + int64_t(h) * rpb_size(p) : nullptr;
  const T* kbase = static_cast<const T*>(p.bm) + (int64_t(c.b) * T_ * Hkv + h / (H / Hkv)) * C;

  for (int n0 = 0; n0 < c.nbox; n0 += kCols) {
    __syncthreads();  // the previous chunk's readers are done (and sA is loaded)
    if (tid < kCols) col_entry(gp, c, n0 + tid, s_cols[tid]);
    __syncthreads();
    load_rows(sB, pitch, s_cols, kCols, kbase, int64_t(Hkv) * C, C, Cp, vec_ok, tid);
    __syncthreads();
    if (!wc.active) continue;
    const unsigned gmask = group_mask(wc, s_cols, lane);
    if (gmask == 0u) continue;

    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

    if constexpr (kMma) {
      for (int kk = 0; kk < Cp; kk += 16) {
        uint32_t af[4];
        ldmatrix_x4(af, sA + (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * pitch + kk +
                        8 * (lane / 16));
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (!((gmask >> nt) & 1u)) continue;
          uint32_t bf[2];
          ldmatrix_x2(bf, sB + (nt * 8 + lane % 8) * pitch + kk + 8 * ((lane / 8) % 2));
          WarpMma<T>::mma(acc[nt], af, bf[0], bf[1]);
        }
      }
    } else {
      const float* A0 = reinterpret_cast<const float*>(sA) + lr0 * pitch;
      const float* A1 = A0 + 8 * pitch;
      for (int kk = 0; kk < Cp; kk += 4) {
        const float4 a0 = *reinterpret_cast<const float4*>(A0 + kk);
        const float4 a1 = *reinterpret_cast<const float4*>(A1 + kk);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          if (!((gmask >> nt) & 1u)) continue;
          const float* B0 = reinterpret_cast<const float*>(sB) + (nt * 8 + 2 * (lane % 4)) * pitch;
          const float4 b0 = *reinterpret_cast<const float4*>(B0 + kk);
          const float4 b1 = *reinterpret_cast<const float4*>(B0 + pitch + kk);
          acc[nt][0] += a0.x * b0.x + a0.y * b0.y + a0.z * b0.z + a0.w * b0.w;
          acc[nt][1] += a0.x * b1.x + a0.y * b1.y + a0.z * b1.z + a0.w * b1.w;
          acc[nt][2] += a1.x * b0.x + a1.y * b0.y + a1.z * b0.z + a1.w * b0.w;
          acc[nt][3] += a1.x * b1.x + a1.y * b1.y + a1.z * b1.z + a1.w * b1.w;
        }
      }
    }

    // Scatter: S[row, col] -> logits[row token, h, j(row, col)] for neighbor pairs.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if (!((gmask >> nt) & 1u)) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const Entry& q = e < 2 ? q0 : q1;
        const Entry& k = s_cols[nt * 8 + 2 * (lane % 4) + (e & 1)];
        if (q.tok < 0 || k.tok < 0) continue;
        const int j = neighbor_j(p, q.start, q.len, k.i);
        if (j < 0) continue;
        float v = acc[nt][e] * p.scale;
        if (rpb != nullptr) v += rpb[rpb_index(p, q.i, k.i)];
        out[(int64_t(q.tok) * H + h) * W + j] = from_float<T>(v);
      }
    }
  }

  // Window entries that are no neighbor (causal windows near the start of an axis).
  if (p.causal[0] | p.causal[1] | p.causal[2]) {
    for (int rr = 0; rr < 16; ++rr) {
      const Entry& q = s_rows[warp * 16 + rr];
      if (q.tok < 0) continue;
      if (q.len[0] == p.kernel[0] && q.len[1] == p.kernel[1] && q.len[2] == p.kernel[2]) continue;
      T* orow = out + (int64_t(q.tok) * H + h) * W;
      for (int j = lane; j < W; j += 32) {
        int ja[3];
        window_entry(p, j, ja);
        if (!(offset_in_window(ja[0], q.len[0]) && offset_in_window(ja[1], q.len[1]) &&
              offset_in_window(ja[2], q.len[2])))
          orow[j] = from_float<T>(p.fill);
      }
    }
  }
}

template <typename T>
cudaError_t launch_pn(const UnfusedParams& p, cudaStream_t stream) {
  GemmParams gp{};
  gp.p = p;
  gp.col_blocks = 1;
  const int kq = std::is_same<T, float>::value ? 4 : 16;
  gp.dim_padded = (p.dim + kq - 1) / kq * kq;
  const dim3 grid = tile_grid(gp, p.heads);
  if (grid.x == 0) return cudaErrorNotSupported;
  const size_t smem = 2 * kRows * sizeof(Entry) +
                      size_t(2) * kRows * (gp.dim_padded + pn_pitch_pad<T>()) * sizeof(T);
  if (smem > static_cast<size_t>(max_dynamic_smem())) return cudaErrorNotSupported;
  cudaError_t err = cudaFuncSetAttribute(gemm_pn_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  gemm_pn_kernel<T><<<grid, kThreads, smem, stream>>>(gp);
  return cudaGetLastError();
}

}  // namespace
}  // namespace gemm

cudaError_t gemm_pn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) { return gemm::launch_pn<decltype(t)>(p, stream); });
}

}  // namespace unfused
}  // namespace natten_jax
