// Instantiations and dtype / head-dim dispatch of the sm80 fused backward kernels.
#include "natten_jax/fna/fna_bwd_sm80.cuh"

namespace natten_jax {
namespace fna {

template <typename T>
static cudaError_t bwd_head_dim(const FnaBwdParams& p, cudaStream_t stream) {
  switch (p.f.head_dim) {
    case 32: return sm80::launch_backward<T, 32>(p, stream);
    case 64: return sm80::launch_backward<T, 64>(p, stream);
    case 128: return sm80::launch_backward<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fna_backward(const FnaBwdParams& p, DType dtype, cudaStream_t stream) {
  int q_log2 = p.f.q_tile_log2[0] + p.f.q_tile_log2[1] + p.f.q_tile_log2[2];
  if (q_log2 != 6) return cudaErrorInvalidValue;  // backward Q tiles hold 64 tokens
  return dtype == DType::kBFloat16 ? bwd_head_dim<__nv_bfloat16>(p, stream)
                                   : bwd_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
