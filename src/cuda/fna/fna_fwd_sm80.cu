// Instantiations and dtype / head-dim dispatch of the sm80 fused forward kernel.
#include <cstdlib>

#include "natten_jax/fna/fna_fwd_sm80.cuh"

namespace natten_jax {
namespace fna {

bool fna_forward_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// Head dim 32, 64-query tiles: CTAs per SM the register budget aims at, from
// $NATTEN_JAX_FNA_SM80_OCC (4, 5 or 6; read once; default 4: 122 registers, no spills; 5 and 6
// spill 56 / 148 bytes a thread). An A/B knob for the latency-bound small-head-dim kernel
// (docs/perf-log.md, session 4).
static int small_head_dim_occupancy() {
  static const int occ = [] {
    const char* s = std::getenv("NATTEN_JAX_FNA_SM80_OCC");
    int v = s ? std::atoi(s) : 4;
    return (v == 5 || v == 6) ? v : 4;
  }();
  return occ;
}

// Q tiles of 64 (one m16 tile per warp) or 128 queries (two per warp).
template <typename T, int D>
static cudaError_t dispatch_q_tile(const FnaFwdParams& p, cudaStream_t stream) {
  int q_log2 = p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2];
  if constexpr (D == 32) {
    if (q_log2 == 6) {
      switch (small_head_dim_occupancy()) {
        case 5: return sm80::launch<T, D, 1, 5>(p, stream);
        case 6: return sm80::launch<T, D, 1, 6>(p, stream);
        default: break;
      }
    }
  }
  if (q_log2 == 6) return sm80::launch<T, D, 1>(p, stream);
  if (q_log2 == 7) return sm80::launch<T, D, 2>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t dispatch_head_dim(const FnaFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return dispatch_q_tile<T, 32>(p, stream);
    case 64: return dispatch_q_tile<T, 64>(p, stream);
    case 128: return dispatch_q_tile<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fna_forward(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, stream)
                                   : dispatch_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
