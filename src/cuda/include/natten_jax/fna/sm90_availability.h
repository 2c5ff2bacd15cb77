// Whether the sm_90a (Hopper) fused kernels can run a call on the current device: one check for
// the forward and the backward kernels (host code).
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"

namespace natten_jax {
namespace fna {

inline bool sm90_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

// Why `what` (e.g. "the sm90 forward kernel") cannot run head dim `head_dim` here ("" if it can):
// the head dim, a compute capability 9.0 device, and sm_90a code in the module.
// `binary_version(head_dim, dtype)` returns the architecture of the code the runtime picked for
// that instantiation on this device (e.g. 90), or -1.
template <typename BinaryVersion>
std::string sm90_unavailable_reason(const char* what, int head_dim, DType dtype,
                                    BinaryVersion binary_version) {
  const std::string w(what);
  if (!sm90_supports_head_dim(head_dim))
    return w + ": head_dim must be 64 or 128, got " + std::to_string(head_dim) +
           " (use impl sm80)";
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return w + ": could not query the current CUDA device";
  }
  if (major != 9 || minor != 0)
    return w + " needs a compute capability 9.0 GPU (H100/H200), this device is " +
           std::to_string(major) + "." + std::to_string(minor) + " (use impl sm80)";
  const int bin = binary_version(head_dim, dtype);
  if (bin != 90)
    return "natten_jax was built without sm_90a code for " + w + " (binary version " +
           std::to_string(bin) + "); rebuild with NATTEN_JAX_CUDA_ARCHS including 90a";
  return "";
}

}  // namespace fna
}  // namespace natten_jax
