// 2^x in one special-function instruction, for the online softmax of every fused kernel.
#pragma once

#include <cuda_runtime.h>

namespace natten_jax {

// 2^x with one MUFU.EX2 (approximate: ~2 ulp; subnormal results flush to zero; 2^-inf = 0).
// exp2f() adds a range check and two multiplies per call to keep subnormal results, which
// the softmax does not need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace natten_jax
