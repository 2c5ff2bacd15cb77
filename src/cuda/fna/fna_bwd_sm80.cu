// Instantiations and dispatch of the sm80 fused backward kernels (head dims of kernel_table.h;
// float32 x the two precisions).
#include <type_traits>

#include "natten_jax/fna/fna_bwd_sm80.cuh"
#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/launch.cuh"

namespace natten_jax {
namespace fna {

cudaError_t fna_backward(const FnaBwdParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_kernel<Impl::kSm80>(dtype, p.f.head_dim, cudaErrorInvalidValue, [&](auto t, auto d) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value;
    if constexpr (std::is_same_v<T, float>) {
      if (p.f.precision) return sm80::launch_backward<T, D, 1>(p, stream);
    }
    return sm80::launch_backward<T, D>(p, stream);
  });
}

}  // namespace fna
}  // namespace natten_jax
