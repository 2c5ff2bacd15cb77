// Operand fragments of the sm80-class fused kernels, one interface for every input type: what a
// warp loads from a shared-memory tile (row pitch `pitch` elements) for one k16 step of an
// m16 x n16 product, and how it multiplies them.
//
//   * fp16 / bf16: mma.sync m16n8k16, fragments by ldmatrix (A: 4 registers; a B pair, two n8
//     tiles: 4 registers).
//   * float32: TF32 mma.sync m16n8k8, two per k16 step, fragments by 32-bit shared loads (A: 8
//     registers, a B pair: 8), raw float32 bits converted at the product: `mma<1>` rounds each
//     operand to TF32 once, `mma<3>` multiplies by 3xTF32 (float32-accurate). A fragment made
//     from accumulators (P or dS, `pack_a`) holds its 8 keys in the order 0, 2, 4, 6, 1, 3, 5, 7
//     (the accumulator layout, no shuffles); `load_bt`, the B operand of exactly those products,
//     reads its k rows in the same order. Bank-conflict free with a 16-byte row pad (pitch
//     D + 4 floats): A / B reads hit bank 4g + t, B^T reads bank 8t + g (+4).
#pragma once

#include <cstdint>
#include <type_traits>

#include "natten_jax/common/fast_exp2.cuh"
#include "natten_jax/common/warp_mma.cuh"

namespace natten_jax {
namespace fna {
namespace sm80 {

// Row pitch (elements) of a shared-memory tile of D-element rows: a 16-byte pad per row.
template <typename T, int D>
__host__ __device__ constexpr int tile_pitch() {
  return D + 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct Frag {  // fp16 / bf16
  using Mma = WarpMma<T>;
  static constexpr int kA = 4;  // registers of an A fragment (16 x k16)
  static constexpr int kB = 4;  // registers of a B pair (k16 x two n8 tiles)

  // A (16 rows x k16) at (row0, col0) of a row-major [m][k] tile.
  static __device__ __forceinline__ void load_a(uint32_t* f, const T* s, int pitch, int row0,
                                                int col0, int lane) {
    ldmatrix_x4(f, s + (row0 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch + col0 +
                       (lane / 16) * 8);
  }
  // B pair: rows n0..n0+15 of an [n][k] tile, k columns col0..col0+15.
  static __device__ __forceinline__ void load_b(uint32_t* f, const T* s, int pitch, int n0,
                                                int col0, int lane) {
    ldmatrix_x4(f, s + (n0 + (lane % 8) + ((lane / 8) / 2) * 8) * pitch + col0 +
                       ((lane / 8) % 2) * 8);
  }
  // B pair from a [k][n] tile: k rows k0..k0+15, n columns n0..n0+15 (the partner of pack_a).
  static __device__ __forceinline__ void load_bt(uint32_t* f, const T* s, int pitch, int k0,
                                                 int n0, int lane) {
    ldmatrix_x4_trans(f, s + (k0 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch + n0 +
                             ((lane / 8) / 2) * 8);
  }
  // c (16 x 8) += a * (n8 tile j of the pair b); kPasses applies to float32 only.
  template <int kPasses>
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b,
                                             int j) {
    Mma::mma(c, a, b[2 * j], b[2 * j + 1]);
  }
  // A fragment (16 x k16) from the accumulators of two n8 tiles (k columns 0-7, 8-15).
  static __device__ __forceinline__ void pack_a(uint32_t* a, const float* c0, const float* c1) {
    a[0] = Mma::pack(c0[0], c0[1]);
    a[1] = Mma::pack(c0[2], c0[3]);
    a[2] = Mma::pack(c1[0], c1[1]);
    a[3] = Mma::pack(c1[2], c1[3]);
  }
  // Two adjacent elements (x first) to shared memory.
  static __device__ __forceinline__ void store2(T* dst, float x, float y) {
    *reinterpret_cast<uint32_t*>(dst) = Mma::pack(x, y);
  }
};

template <>
struct Frag<float> {
  static constexpr int kA = 8;
  static constexpr int kB = 8;

  static __device__ __forceinline__ uint32_t at(const float* s, int i) {
    return __float_as_uint(s[i]);
  }
  static __device__ __forceinline__ void load_a(uint32_t* f, const float* s, int pitch, int row0,
                                                int col0, int lane) {
    const float* r0 = s + (row0 + lane / 4) * pitch + col0 + lane % 4;
    const float* r1 = r0 + 8 * pitch;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // k halves: columns col0 + 8h ..
      f[4 * h + 0] = at(r0, 8 * h);
      f[4 * h + 1] = at(r1, 8 * h);
      f[4 * h + 2] = at(r0, 8 * h + 4);
      f[4 * h + 3] = at(r1, 8 * h + 4);
    }
  }
  // Pair registers: [4 j + 2 h + i] = n8 tile j, k half h, B register i.
  static __device__ __forceinline__ void load_b(uint32_t* f, const float* s, int pitch, int n0,
                                                int col0, int lane) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float* r = s + (n0 + 8 * j + lane / 4) * pitch + col0 + lane % 4;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        f[4 * j + 2 * h] = at(r, 8 * h);
        f[4 * j + 2 * h + 1] = at(r, 8 * h + 4);
      }
    }
  }
  static __device__ __forceinline__ void load_bt(uint32_t* f, const float* s, int pitch, int k0,
                                                 int n0, int lane) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // k rows k0 + 8h + 2t (register 0) and + 1 (register 1)
        const float* r = s + (k0 + 8 * h + 2 * (lane % 4)) * pitch + n0 + 8 * j + lane / 4;
        f[4 * j + 2 * h] = at(r, 0);
        f[4 * j + 2 * h + 1] = at(r, pitch);
      }
    }
  }
  template <int kPasses>
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b,
                                             int j) {
    static_assert(kPasses == 1 || kPasses == 3, "1 (TF32) or 3 (3xTF32) passes");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* ah = a + 4 * h;
      const uint32_t* bh = b + 4 * j + 2 * h;
      if constexpr (kPasses == 1) {
        mma_tf32(c, tf32_rna(__uint_as_float(ah[0])), tf32_rna(__uint_as_float(ah[1])),
                 tf32_rna(__uint_as_float(ah[2])), tf32_rna(__uint_as_float(ah[3])),
                 tf32_rna(__uint_as_float(bh[0])), tf32_rna(__uint_as_float(bh[1])));
      } else {
        uint32_t ab[4], as[4], bb[2], bs[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) tf32_split(__uint_as_float(ah[i]), ab[i], as[i]);
#pragma unroll
        for (int i = 0; i < 2; ++i) tf32_split(__uint_as_float(bh[i]), bb[i], bs[i]);
        // small terms first: they are the smallest addends
        mma_tf32(c, as[0], as[1], as[2], as[3], bb[0], bb[1]);
        mma_tf32(c, ab[0], ab[1], ab[2], ab[3], bs[0], bs[1]);
        mma_tf32(c, ab[0], ab[1], ab[2], ab[3], bb[0], bb[1]);
      }
    }
  }
  // Accumulator (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) of each n8 tile -> A columns t and
  // t + 4 (keys 2t and 2t + 1: the order load_bt reads).
  static __device__ __forceinline__ void pack_a(uint32_t* a, const float* c0, const float* c1) {
    const float* c[2] = {c0, c1};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      a[4 * h + 0] = __float_as_uint(c[h][0]);
      a[4 * h + 1] = __float_as_uint(c[h][2]);
      a[4 * h + 2] = __float_as_uint(c[h][1]);
      a[4 * h + 3] = __float_as_uint(c[h][3]);
    }
  }
  static __device__ __forceinline__ void store2(float* dst, float x, float y) {
    *reinterpret_cast<float2*>(dst) = make_float2(x, y);
  }
};

// Products of a kernel instantiation in float32: the scores S = Q K^T (exp amplifies their
// absolute error) and dP = dO V^T (dS = P (dP - delta) cancels where P is one-hot) always by
// 3xTF32; every other product by 3xTF32 if kPrec (JAX's "highest"), else by one TF32 pass.
template <int kPrec>
struct Passes {
  static constexpr int kScores = 3;
  static constexpr int kOther = kPrec ? 3 : 1;
};

// The units of the online softmax: row maxima m, P = exp(logit - m), the logsumexp (natural
// log, as stored) and its form `lse_units` for recomputing P in the backward kernels.
//   * fp16 / bf16: base-2 units (logit = s * scale * log2(e)): one FFMA and one EX2 per element.
//   * float32 (logits may exceed 2^24, where an ulp is above 1): natural units, each logit the
//     rounded product s * scale in the forward and the backward alike, so that a row's largest
//     term is exactly e^0 and the logsumexp of a saturated row is exactly its maximum: P
//     recomputed from the stored logsumexp equals the forward's (a fused multiply-add, or a
//     change of base, moves the exponent by up to half an ulp of the logit: e^512 at 2^33).
//     The backward exponent is clamped at 0 (P <= 1).
template <typename T>
struct SoftmaxUnits {
  float c;  // scale * log2(e)
  __device__ __forceinline__ explicit SoftmaxUnits(float scale_log2) : c(scale_log2) {}
  __device__ __forceinline__ float logit(float s) const { return s * c; }
  __device__ __forceinline__ float exp_of(float s, float m) const {
    return fast_exp2(fmaf(s, c, -m));
  }
  __device__ __forceinline__ float exp_diff(float a, float b) const { return fast_exp2(a - b); }
  __device__ __forceinline__ float lse(float m, float l) const {
    return (m + log2f(l)) * 0.69314718055994530942f;
  }
  __device__ __forceinline__ float lse_units(float lse) const {
    return lse * 1.4426950408889634f;
  }
  __device__ __forceinline__ float backward_exp(float s, float lse_u) const {
    return fast_exp2(fmaf(s, c, -lse_u));
  }
};
template <>
struct SoftmaxUnits<float> {
  static constexpr float kLog2e = 1.4426950408889634f;
  float c;  // scale
  __device__ __forceinline__ explicit SoftmaxUnits(float scale_log2) {
    c = __fmul_rn(scale_log2, 0.69314718055994530942f);  // the same in every kernel
  }
  __device__ __forceinline__ float logit(float s) const { return __fmul_rn(s, c); }
  __device__ __forceinline__ float exp_of(float s, float m) const {
    return fast_exp2(__fmul_rn(logit(s) - m, kLog2e));
  }
  __device__ __forceinline__ float exp_diff(float a, float b) const {
    return fast_exp2(__fmul_rn(a - b, kLog2e));
  }
  __device__ __forceinline__ float lse(float m, float l) const {
    return m + log2f(l) * 0.69314718055994530942f;
  }
  __device__ __forceinline__ float lse_units(float lse) const { return lse; }
  __device__ __forceinline__ float backward_exp(float s, float lse_u) const {
    return fast_exp2(fminf(__fmul_rn(logit(s) - lse_u, kLog2e), 0.f));
  }
};

}  // namespace sm80
}  // namespace fna
}  // namespace natten_jax
