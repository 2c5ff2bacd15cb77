// Launch helpers of the unfused kernels: grid sizes for one-thread-per-element kernels and the
// dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/unfused/unfused_params.h"

namespace natten_jax {
namespace unfused {

constexpr int kNaiveThreads = 256;

// Blocks for a grid-stride loop over `n` elements (capped; the loop covers the rest).
inline unsigned naive_blocks(int64_t n) {
  int64_t b = (n + kNaiveThreads - 1) / kNaiveThreads;
  const int64_t cap = int64_t(1) << 20;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// Calls f(T{}) with T the element type of `dtype`; returns cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace unfused
}  // namespace natten_jax
