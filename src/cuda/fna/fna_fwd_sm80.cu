// Instantiations and dtype / head-dim dispatch of the sm80 fused forward kernel.
#include "natten_jax/fna/fna_fwd_sm80.cuh"

namespace natten_jax {
namespace fna {

bool fna_forward_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

template <typename T>
static cudaError_t dispatch_head_dim(const FnaFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return sm80::launch<T, 32>(p, stream);
    case 64: return sm80::launch<T, 64>(p, stream);
    case 128: return sm80::launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fna_forward(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, stream)
                                   : dispatch_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
