// Instantiations, availability check and dispatch of the sm_90a fused backward kernels
// (dtype x head dim: 4 instantiations of each kernel).
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and the FFI handler refuses to start them on anything but a
// compute capability 9.0 device running sm_90a code.
#include <string>

#include "natten_jax/fna/fna_bwd_sm90.cuh"
#include "natten_jax/fna/fna_bwd_sm90.h"
#include "natten_jax/fna/sm90_availability.h"

namespace natten_jax {
namespace fna {

namespace {

template <typename T>
cudaError_t dispatch_head_dim(const FnaBwdParams& p, cudaStream_t stream) {
  switch (p.f.head_dim) {
    case 64: return sm90::bwd::launch_backward<T, 64>(p, stream);
    case 128: return sm90::bwd::launch_backward<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Architecture of the code the runtime picked for the kernels on this device (e.g. 90), or -1
// (the lower of the two kernels').
template <typename T, int D>
int binary_version() {
  cudaFuncAttributes a{}, b{};
  if (cudaFuncGetAttributes(&a, sm90::bwd::fna_bwd_dq_sm90_kernel<T, D>) != cudaSuccess ||
      cudaFuncGetAttributes(&b, sm90::bwd::fna_bwd_dkdv_sm90_kernel<T, D>) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return a.binaryVersion < b.binaryVersion ? a.binaryVersion : b.binaryVersion;
}

}  // namespace

std::string fna_backward_sm90_unavailable_reason(int head_dim, DType dtype) {
  return sm90_unavailable_reason("the sm90 backward kernels", head_dim, dtype, [](int d, DType t) {
    const bool f16 = t != DType::kBFloat16;
    if (d == 64) return f16 ? binary_version<__half, 64>() : binary_version<__nv_bfloat16, 64>();
    return f16 ? binary_version<__half, 128>() : binary_version<__nv_bfloat16, 128>();
  });
}

cudaError_t fna_backward_sm90(const FnaBwdParams& p, DType dtype, cudaStream_t stream) {
  const int q_log2 = p.f.q_tile_log2[0] + p.f.q_tile_log2[1] + p.f.q_tile_log2[2];
  const int kv_log2 = p.f.kv_tile_log2[0] + p.f.kv_tile_log2[1] + p.f.kv_tile_log2[2];
  if (q_log2 != 6 || kv_log2 != 6) return cudaErrorInvalidValue;  // 64-token tiles and boxes
  return dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, stream)
                                   : dispatch_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
