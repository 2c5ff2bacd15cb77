// GEMM-based IN (inverse neighborhood: weights^T x queries-side features, per key tile):
// instantiations of gemm_weighted_sum.cuh.
#include "natten_jax/unfused/gemm_weighted_sum.cuh"
#include "natten_jax/unfused/launch_utils.cuh"

namespace natten_jax {
namespace unfused {

cudaError_t gemm_in(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    return gemm::launch_weighted_sum<decltype(t), true>(p, stream);
  });
}

}  // namespace unfused
}  // namespace natten_jax
