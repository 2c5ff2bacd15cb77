// GEMM-based NN (attention weights x values): gemm_weighted_sum.cuh with rows = queries.
#include "natten_jax/unfused/gemm_weighted_sum.cuh"

cudaError_t natten_jax::unfused::gemm_nn(const UnfusedParams& p, DType dtype,
                                         cudaStream_t stream) {
  return gemm::weighted_sum<false>(p, dtype, stream);
}
