// Bit-level helpers of the GEMM-based unfused kernels; the tensor-core primitives themselves
// (mma.sync, ldmatrix, fragment layouts) live in natten_jax/common/warp_mma.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/common/warp_mma.cuh"

namespace natten_jax {
namespace unfused {

// Raw bits of a 16-bit element in global memory (read-only path).
template <typename T>
__device__ __forceinline__ uint32_t load_bits16(const T* p) {
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

__device__ __forceinline__ uint32_t pack_bits16(uint32_t lo, uint32_t hi) { return lo | (hi << 16); }

}  // namespace unfused
}  // namespace natten_jax
