// Instantiations, availability check and dispatch of the sm_90a fused backward kernels
// (dtype x head dim: 4 instantiations of each kernel).
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and the FFI handler refuses to start them on anything but a
// compute capability 9.0 device running sm_90a code.
#include <string>

#include "natten_jax/fna/fna_bwd_sm90.cuh"
#include "natten_jax/fna/fna_bwd_sm90.h"

namespace natten_jax {
namespace fna {

bool fna_backward_sm90_supports_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 128;
}

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
  if (!fna_backward_sm90_supports_head_dim(head_dim))
    return "the sm90 backward kernels support head_dim 64 and 128, got " +
           std::to_string(head_dim) + " (use impl sm80)";
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return "the sm90 backward kernels could not query the current CUDA device";
  }
  if (major != 9 || minor != 0)
    return "the sm90 backward kernels need a compute capability 9.0 GPU (H100/H200), this "
           "device is " + std::to_string(major) + "." + std::to_string(minor) + " (use impl sm80)";
  int bin = 0;
  switch (head_dim * 2 + (dtype == DType::kBFloat16 ? 1 : 0)) {
    case 128: bin = binary_version<__half, 64>(); break;
    case 129: bin = binary_version<__nv_bfloat16, 64>(); break;
    case 256: bin = binary_version<__half, 128>(); break;
    default: bin = binary_version<__nv_bfloat16, 128>(); break;
  }
  if (bin != 90)
    return "natten_jax was built without sm_90a code for the sm90 backward kernels (binary "
           "version " + std::to_string(bin) + "); rebuild with NATTEN_JAX_CUDA_ARCHS including 90a";
  return "";
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
