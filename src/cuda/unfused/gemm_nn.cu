// GEMM-based NN (attention weights x values): instantiations of gemm_weighted_sum.cuh.
#include "natten_jax/unfused/gemm_weighted_sum.cuh"
#include "natten_jax/unfused/launch_utils.cuh"

namespace natten_jax {
namespace unfused {

cudaError_t gemm_nn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    return gemm::launch_weighted_sum<decltype(t), false>(p, stream);
  });
}

}  // namespace unfused
}  // namespace natten_jax
