// Warpgroup GEMM steps of the sm_90a fused kernels on 64-row tiles in the swizzled shared-memory
// layout of sm90_common.cuh: S = A B^T with both operands in shared memory (K-major), acc += A B
// with A in registers and B in shared memory (MN-major), and the fp32 accumulator -> A-operand
// conversion between them.
#pragma once

#include <cstdint>

#include "natten_jax/fna/sm90_common.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {

constexpr int kRowBytes = 128;  // one row of a 64-element column block

// D / 16 k16 steps of an SS product (64 x N, fp32; N = 2 * NA: 64 or 128 keys) = A (64 rows at
// a_addr) x B^T (N rows at b_addr), both K-major tiles of D columns whose 64-column blocks are
// kABlock / kBBlock bytes apart.
template <typename T, int D, int kABlock, int kBBlock, int NA>
__device__ __forceinline__ void issue_ss(float (&acc)[NA], uint32_t a_addr, uint32_t b_addr) {
  static_assert(NA == 32 || NA == 64, "64 or 128 columns");
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t off = (kk % 4) * 32;  // k16 slice within the 64-element block
    const uint64_t da = gmma_desc(a_addr + (kk / 4) * kABlock + off, 16, 1024);
    const uint64_t db = gmma_desc(b_addr + (kk / 4) * kBBlock + off, 16, 1024);
    if constexpr (NA == 64) {
      Gmma<T>::ss_n128(acc, da, db, kk > 0 ? 1 : 0);
    } else {
      Gmma<T>::ss_n64(acc, da, db, kk > 0 ? 1 : 0);
    }
  }
}

// acc (64 x D) += A (64 x 16 KK, registers, KK k16 fragments) x B (16 KK rows at b_addr,
// MN-major: the rows are the k dimension, the D columns the n dimension; column blocks of 16 KK
// rows).
template <typename T, int D, int KK>
__device__ __forceinline__ void issue_rs(float (&acc)[D / 2], const uint32_t (&a)[KK][4],
                                         uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const uint64_t db = gmma_desc(b_addr + kk * 16 * kRowBytes, 16 * KK * kRowBytes, 1024);
    if constexpr (D == 128) {
      Gmma<T>::rs_n128(acc, a[kk], db);
    } else {
      Gmma<T>::rs_n64(acc, a[kk], db);
    }
  }
}

// Whether column 8n + 2 quad + e of an accumulator fragment row is set in key mask `m` (a
// BoxKeyMask row mask already shifted right by 2 quad).
__device__ __forceinline__ bool mask_bit(uint64_t m, int n, int e) {
  const uint32_t word = n < 4 ? static_cast<uint32_t>(m) : static_cast<uint32_t>(m >> 32);
  return (word >> (8 * (n % 4) + e)) & 1u;
}

// A-operand fragments (KK k16 steps) from a 64 x 16 KK fp32 accumulator fragment.
template <typename T, int KK>
__device__ __forceinline__ void pack_a(uint32_t (&a)[KK][4], const float (&x)[8 * KK]) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    a[kk][0] = pack2<T>(x[8 * kk + 0], x[8 * kk + 1]);
    a[kk][1] = pack2<T>(x[8 * kk + 2], x[8 * kk + 3]);
    a[kk][2] = pack2<T>(x[8 * kk + 4], x[8 * kk + 5]);
    a[kk][3] = pack2<T>(x[8 * kk + 6], x[8 * kk + 7]);
  }
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
