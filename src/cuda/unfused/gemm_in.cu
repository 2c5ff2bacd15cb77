// GEMM-based IN (inverse neighborhood: weights^T x queries-side features, per key tile):
// gemm_weighted_sum.cuh with rows = keys.
#include "natten_jax/unfused/gemm_weighted_sum.cuh"

cudaError_t natten_jax::unfused::gemm_in(const UnfusedParams& p, DType dtype,
                                         cudaStream_t stream) {
  return gemm::weighted_sum<true>(p, dtype, stream);
}
