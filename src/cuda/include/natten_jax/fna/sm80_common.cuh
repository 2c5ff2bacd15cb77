// Building blocks shared by the sm80-class fused kernels (forward and backward): MMA and
// ldmatrix / cp.async wrappers, multi-dimensional tile coordinates, predicated tile loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace natten_jax {
namespace fna {
namespace sm80 {

constexpr int kTileKV = 64;   // keys per KV box (and query rows per CTA per m-tile)
constexpr int kThreads = 128;

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__half> {
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination (used for tokens outside range).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Local coordinates of row `r` of a 3-D tile of 2^l[0] x 2^l[1] x 2^l[2] tokens (row-major).
__device__ __forceinline__ void tile_coord(int r, const int* l, int* c) {
  c[2] = r & ((1 << l[2]) - 1);
  c[1] = (r >> l[2]) & ((1 << l[1]) - 1);
  c[0] = r >> (l[1] + l[2]);
}

// Loads 64 rows of `D` elements into each of `n` shared-memory tiles from `n` sources that
// share one token layout (K and V do): row r is token (origin + tile_coord(r)) if it lies below
// `limit` on every axis, else zeros. Each `base[i]` already points at (batch, group, head).
template <typename T, int D, int N>
__device__ __forceinline__ void load_tiles(T* const (&smem)[N], const T* const (&base)[N],
                                           const int64_t* tok_stride, const int* dil,
                                           const int* origin, const int* limit, const int* l2,
                                           int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPitch = D + 8;
#pragma unroll
  for (int i = 0; i < (kTileKV * kChunks) / kThreads; ++i) {
    int idx = tid + i * kThreads;
    int row = idx / kChunks, chunk = idx % kChunks;
    int c[3];
    tile_coord(row, l2, c);
    bool valid = true;
    int64_t off = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      int x = origin[a] + c[a];
      valid = valid && (x < limit[a]);
      off += static_cast<int64_t>(x) * dil[a] * tok_stride[a];
    }
    off = valid ? off + chunk * 8 : 0;
#pragma unroll
    for (int t = 0; t < N; ++t) cp_async16(smem[t] + row * kPitch + chunk * 8, base[t] + off, valid);
  }
}

}  // namespace sm80
}  // namespace fna
}  // namespace natten_jax
