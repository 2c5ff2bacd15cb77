// Instantiations, availability check and dispatch of the sm_90a fused forward kernel: head dims
// of kernel_table.h x {one consumer warpgroup (64-query tiles) with 64-key boxes, two (128-query
// tiles) with 64- or 128-key boxes}.
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and ffi/fna.cc refuses to start them on anything but a compute
// capability 9.0 device running sm_90a code (fna_forward_sm90_unavailable_reason).
#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/fna_fwd_sm90.cuh"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/sm90_availability.h"

namespace natten_jax {
namespace fna {

std::string fna_forward_sm90_unavailable_reason(int head_dim, DType dtype) {
  return sm90_unavailable_reason("the sm90 forward kernel", [&] {
    return dispatch_kernel<Impl::kSm90>(dtype, head_dim, -1, [](auto t, auto d) {
      using T = typename decltype(t)::type;
      constexpr int D = decltype(d)::value;
      return kernels_code_version(sm90::fna_fwd_sm90_kernel<T, D, 1, 64>,
                                  sm90::fna_fwd_sm90_kernel<T, D, 2, 64>,
                                  sm90::fna_fwd_sm90_kernel<T, D, 2, 128>);
    });
  });
}

cudaError_t fna_forward_sm90(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  const bool q64 = p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2] == 6;
  const bool kv128 = p.kv_tile_log2[0] + p.kv_tile_log2[1] + p.kv_tile_log2[2] == 7;
  return dispatch_kernel<Impl::kSm90>(dtype, p.head_dim, cudaErrorInvalidValue, [&](auto t, auto d) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value;
    if (q64) return sm90::launch<T, D, 1, 64>(p, stream);
    return kv128 ? sm90::launch<T, D, 2, 128>(p, stream) : sm90::launch<T, D, 2, 64>(p, stream);
  });
}

}  // namespace fna
}  // namespace natten_jax
