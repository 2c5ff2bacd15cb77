// Instantiations and dispatch of the sm80 fused forward kernel: head dims of kernel_table.h x Q
// tiles of 64 / 128 queries (x the occupancy variants at head dim 32, 64-query tiles); float32:
// 64-query tiles x the two precisions.
#include <type_traits>

#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/fna_fwd_sm80.cuh"
#include "natten_jax/fna/launch.cuh"

namespace natten_jax {
namespace fna {

cudaError_t fna_forward(const FnaFwdParams& p, DType dtype, int occupancy, cudaStream_t stream) {
  const bool q64 = p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2] == 6;
  return dispatch_kernel<Impl::kSm80>(dtype, p.head_dim, cudaErrorInvalidValue, [&](auto t, auto d) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value;
    if constexpr (std::is_same_v<T, float>) {  // 64-query tiles (checked by ffi/fna.cc)
      return p.precision ? sm80::launch<T, D, 1, sm80::min_ctas_per_sm<T, D, 1>(), 1>(p, stream)
                         : sm80::launch<T, D, 1>(p, stream);
    } else {
      if constexpr (D == 32) {
        switch (q64 ? occupancy : 0) {
#define NJ_OCC(N) \
  case N: return sm80::launch<T, D, 1, N>(p, stream);
          NJ_FNA_SM80_OCCUPANCY_VARIANTS(NJ_OCC)
#undef NJ_OCC
          default: break;
        }
      }
      return q64 ? sm80::launch<T, D, 1>(p, stream) : sm80::launch<T, D, 2>(p, stream);
    }
  });
}

}  // namespace fna
}  // namespace natten_jax
