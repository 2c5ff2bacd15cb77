// Host helpers shared by every fused kernel's launcher and dispatcher: the launch itself (opting
// in to the kernel's dynamic shared memory) and the dtype x head-dim dispatch over the
// instantiations of kernel_table.h.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/kernel_table.h"

namespace natten_jax {
namespace fna {

// Launches `kernel` on `grid` x `threads` with `smem_bytes` of dynamic shared memory (allowed
// beyond 48 KB first; with `max_shared`, all of the unified L1 / shared memory as shared memory).
// Returns the first CUDA error (attribute or launch).
template <typename Params>
cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes,
                          bool max_shared, const Params& p, cudaStream_t stream) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  if (max_shared) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// Grid of a query-stationary kernel (forward, dQ): x Q tiles, y heads x dilation groups, z batch.
inline dim3 q_tile_grid(const FnaFwdParams& p) {
  return dim3(p.num_q_tiles[0] * p.num_q_tiles[1] * p.num_q_tiles[2],
              p.heads * p.dilation[0] * p.dilation[1] * p.dilation[2], p.batch);
}

// The element type T and head dim D of one instantiation, as values for a generic lambda:
// `[&](auto t, auto d) { using T = typename decltype(t)::type; constexpr int D = decltype(d)::value; }`.
template <typename T>
struct TypeTag {
  using type = T;
};
template <int D>
using HeadDim = std::integral_constant<int, D>;

// op(TypeTag<T>{}, HeadDim<D>{}) for the dtype and the head dim of a call, over the head dims
// implementation I is built with (kernel_table.h); `otherwise` for a head dim without a kernel
// (unreachable once ffi/fna.cc has checked the call). float32 (TF32 products) only on sm80.
template <Impl I, typename R, typename Op>
R dispatch_kernel(DType dtype, int head_dim, R otherwise, Op&& op) {
  const bool bf16 = dtype == DType::kBFloat16;
#define NJ_CASE(D) \
  case D: return bf16 ? op(TypeTag<__nv_bfloat16>{}, HeadDim<D>{}) : op(TypeTag<__half>{}, HeadDim<D>{});
#define NJ_CASE_F32(D) \
  case D: return op(TypeTag<float>{}, HeadDim<D>{});
  if constexpr (I == Impl::kSm80) {
    if (dtype == DType::kFloat32) {
      switch (head_dim) { NJ_FNA_SM80_HEAD_DIMS(NJ_CASE_F32) }
      return otherwise;
    }
    switch (head_dim) { NJ_FNA_SM80_HEAD_DIMS(NJ_CASE) }
  } else {
    if (dtype == DType::kFloat32) return otherwise;
    switch (head_dim) { NJ_FNA_SM90_HEAD_DIMS(NJ_CASE) }
  }
#undef NJ_CASE
#undef NJ_CASE_F32
  return otherwise;
}

}  // namespace fna
}  // namespace natten_jax
