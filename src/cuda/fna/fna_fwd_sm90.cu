// Instantiations, availability check and dispatch of the sm_90a fused forward kernel.
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and the launcher refuses to start them on anything but a compute
// capability 9.0 device running sm_90a code.
#include <string>

#include "natten_jax/fna/fna_fwd_sm90.cuh"
#include "natten_jax/fna/fna_fwd_sm90.h"
#include "natten_jax/fna/sm90_availability.h"

namespace natten_jax {
namespace fna {

namespace {

template <typename T, int D>
cudaError_t dispatch_q_tile(const FnaFwdParams& p, cudaStream_t stream) {
  const int q_log2 = p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2];
  if (q_log2 == 6) return sm90::launch<T, D, 1>(p, stream);
  if (q_log2 == 7) return sm90::launch<T, D, 2>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_head_dim(const FnaFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return dispatch_q_tile<T, 64>(p, stream);
    case 128: return dispatch_q_tile<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Architecture of the code the runtime picked for the kernel on this device (e.g. 90), or -1.
template <typename T, int D>
int binary_version() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, sm90::fna_fwd_sm90_kernel<T, D, 2>) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error of the query
    return -1;
  }
  return attr.binaryVersion;
}

}  // namespace

std::string fna_forward_sm90_unavailable_reason(int head_dim, DType dtype) {
  return sm90_unavailable_reason("the sm90 forward kernel", head_dim, dtype, [](int d, DType t) {
    const bool f16 = t != DType::kBFloat16;
    if (d == 64) return f16 ? binary_version<__half, 64>() : binary_version<__nv_bfloat16, 64>();
    return f16 ? binary_version<__half, 128>() : binary_version<__nv_bfloat16, 128>();
  });
}

cudaError_t fna_forward_sm90(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, stream)
                                   : dispatch_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
