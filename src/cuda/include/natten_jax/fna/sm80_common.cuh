// Building blocks shared by the sm80-class fused kernels (forward and backward): cp.async
// wrappers, multi-dimensional tile coordinates, predicated tile loads (operand fragments and
// products: sm80_frag.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/common/fast_exp2.cuh"
#include "natten_jax/common/warp_mma.cuh"
#include "natten_jax/fna/sm80_frag.cuh"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {
namespace sm80 {

constexpr int kTileKV = 64;   // keys per KV box (and query rows per CTA per m-tile)
constexpr int kThreads = 128;

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

// Step `j` of `n` of a double-buffered cp.async pipeline (item j in stage j & 1): starts
// loading item j + 1 into the other stage (`load(j + 1, stage)`), then waits until item j has
// landed and every thread of the CTA sees it.
template <typename Load>
__device__ __forceinline__ void pipeline_step(int j, int n, Load&& load) {
  if (j + 1 < n) {
    load(j + 1, (j & 1) ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// Moves box origin `o` to the next of the nbox[0] x nbox[1] x nbox[2] boxes (extents 2^l) that
// tile a region from corner `lo`, in row-major order, like an odometer: no division per box.
__device__ __forceinline__ void next_box(int* o, const int* lo, const int* nbox, const int* l) {
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    o[a] += 1 << l[a];
    if (a == 0 || o[a] < lo[a] + (nbox[a] << l[a])) break;
    o[a] = lo[a];
  }
}

// Loads 64 rows of `D` elements into each of `n` shared-memory tiles from `n` sources that
// share one token layout (K and V do): row r is token (origin + tile_coord(r)) if it lies below
// `limit` on every axis, else zeros. Each `base[i]` already points at (batch, group, head).
template <typename T, int D, int N>
__device__ __forceinline__ void load_tiles(T* const (&smem)[N], const T* const (&base)[N],
                                           const int64_t* tok_stride, const FastDiv* dil,
                                           const int* origin, const int* limit, const int* l2,
                                           int tid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  constexpr int kChunks = D / kVec;                         // chunks per row
  constexpr int kPitch = tile_pitch<T, D>();
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
    off = valid ? off + chunk * kVec : 0;
#pragma unroll
    for (int t = 0; t < N; ++t)
      cp_async16(smem[t] + row * kPitch + chunk * kVec, base[t] + off, valid);
  }
}

}  // namespace sm80
}  // namespace fna
}  // namespace natten_jax
