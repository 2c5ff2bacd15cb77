// Instantiations, availability check and dispatch of the sm_90a fused forward kernel.
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and the launcher refuses to start them on anything but a compute
// capability 9.0 device running sm_90a code.
#include <string>

#include "natten_jax/fna/fna_fwd_sm90.cuh"
#include "natten_jax/fna/fna_fwd_sm90.h"

namespace natten_jax {
namespace fna {

bool fna_forward_sm90_supports_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

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
  if (!fna_forward_sm90_supports_head_dim(head_dim))
    return "the sm90 forward kernel supports head_dim 64 and 128, got " +
           std::to_string(head_dim) + " (use impl sm80)";
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return "the sm90 forward kernel could not query the current CUDA device";
  }
  if (major != 9 || minor != 0)
    return "the sm90 forward kernel needs a compute capability 9.0 GPU (H100/H200), this device "
           "is " + std::to_string(major) + "." + std::to_string(minor) + " (use impl sm80)";
  int bin = 0;
  switch (head_dim * 2 + (dtype == DType::kBFloat16 ? 1 : 0)) {
    case 128: bin = binary_version<__half, 64>(); break;
    case 129: bin = binary_version<__nv_bfloat16, 64>(); break;
    case 256: bin = binary_version<__half, 128>(); break;
    default: bin = binary_version<__nv_bfloat16, 128>(); break;
  }
  if (bin != 90)
    return "natten_jax was built without sm_90a code for the sm90 forward kernel (binary version " +
           std::to_string(bin) + "); rebuild with NATTEN_JAX_CUDA_ARCHS including 90a";
  return "";
}

cudaError_t fna_forward_sm90(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, stream)
                                   : dispatch_head_dim<__half>(p, stream);
}

}  // namespace fna
}  // namespace natten_jax
