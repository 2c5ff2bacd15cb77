// Instantiations, availability check and dispatch of the sm_90a fused backward kernels (dQ and
// dK/dV; head dims of kernel_table.h).
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and ffi/fna.cc refuses to start them on anything but a compute
// capability 9.0 device running sm_90a code (fna_backward_sm90_unavailable_reason).
#include "natten_jax/fna/fna_bwd_sm90.cuh"
#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/sm90_availability.h"

namespace natten_jax {
namespace fna {

std::string fna_backward_sm90_unavailable_reason(int head_dim, DType dtype) {
  return sm90_unavailable_reason("the sm90 backward kernels", [&] {
    return dispatch_kernel<Impl::kSm90>(dtype, head_dim, -1, [](auto t, auto d) {
      using T = typename decltype(t)::type;
      constexpr int D = decltype(d)::value;
      return kernels_code_version(sm90::bwd::fna_bwd_dq_sm90_kernel<T, D>,
                                  sm90::bwd::fna_bwd_dkdv_sm90_kernel<T, D>);
    });
  });
}

cudaError_t fna_backward_sm90(const FnaBwdParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_kernel<Impl::kSm90>(dtype, p.f.head_dim, cudaErrorInvalidValue, [&](auto t, auto d) {
    return sm90::bwd::launch_backward<typename decltype(t)::type, decltype(d)::value>(p, stream);
  });
}

}  // namespace fna
}  // namespace natten_jax
