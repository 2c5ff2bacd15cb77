// Warp-level tensor-core primitives shared by the sm80-class kernels (fused forward/backward and
// the GEMM-based unfused operators): mma.sync m16n8k16 with fp16 / bf16 inputs and fp32
// accumulators, ldmatrix, and packing two fp32 values into one fragment register; mma.sync
// m16n8k8 with TF32 inputs for float32.
//
// Fragment layouts (PTX ISA, m16n8k16): lane l, group g = l / 4, t = l % 4;
//   A (16 x 16, row-major):  reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..),
//                            reg3 = (g+8, 2t+8..)
//   B (16 x 8, k x n):       reg0 = (k 2t..2t+1, n g), reg1 = (k 2t+8.., n g)
//   C (16 x 8, fp32):        c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// The low 16 bits of a register hold the element with the smaller column (A) or k (B).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace natten_jax {

template <typename T>
struct WarpMma;

#define NJ_WARP_MMA(T, PTX_TYPE, PACK2, VEC2)                                                  \
  template <>                                                                                  \
  struct WarpMma<T> {                                                                          \
    /* c (16 x 8, fp32) += a (16 x 16) * b (16 x 8) */                                          \
    static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,       \
                                               uint32_t b1) {                                  \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE              \
                   ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"              \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                            \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));            \
    }                                                                                          \
    /* x in the low 16 bits, y in the high */                                                  \
    static __device__ __forceinline__ uint32_t pack(float x, float y) {                        \
      VEC2 h = PACK2(x, y);                                                                    \
      return *reinterpret_cast<uint32_t*>(&h);                                                 \
    }                                                                                          \
  };
NJ_WARP_MMA(__half, "f16", __floats2half2_rn, __half2)
NJ_WARP_MMA(__nv_bfloat16, "bf16", __floats2bfloat162_rn, __nv_bfloat162)
#undef NJ_WARP_MMA

// TF32 (mma.sync m16n8k8, fp32 accumulators) for float32 inputs. Fragment layouts (PTX ISA):
//   A (16 x 8):  reg0 = (g, t), reg1 = (g+8, t), reg2 = (g, t+4), reg3 = (g+8, t+4)
//   B (8 x 8):   reg0 = (k t, n g), reg1 = (k t+4, n g)
//   C (16 x 8):  as m16n8k16.
// Operands are TF32 bit patterns (tf32_rna: float32 rounded to TF32, to nearest).
__device__ __forceinline__ void mma_tf32(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// float32 -> TF32 (round to nearest, ties away; a pure function: not volatile, so repeated
// conversions of one register are merged).
__device__ __forceinline__ uint32_t tf32_rna(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// x = big + small + O(2^-22 |x|): both TF32 (3xTF32 products: big * big + big * small +
// small * big are float32-accurate).
__device__ __forceinline__ void tf32_split(float x, uint32_t& big, uint32_t& small) {
  big = tf32_rna(x);
  small = tf32_rna(x - __uint_as_float(big));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Two 8x8 b16 matrices; lanes 0..15 give the row addresses (the others' are ignored).
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// As ldmatrix_x4, each matrix transposed (lane l receives column l / 4 of the stored rows).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

}  // namespace natten_jax
