// Whether the sm_90a (Hopper) fused kernels can run on the current device: one check for the
// forward and the backward kernels (host code).
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"

namespace natten_jax {
namespace fna {

// Lowest code version (e.g. 90: the architecture of the code the runtime picked on this device)
// of `kernels`, or -1 if one cannot be queried, or -2 if one has static shared memory: the
// swizzled wgmma layouts need the dynamic shared memory to start at its declared 1024-byte
// alignment, which static shared memory would shift (a build error, refused here on the host).
template <typename... Kernel>
int kernels_code_version(Kernel... kernels) {
  int version = 1 << 30;
  for (const void* k : {reinterpret_cast<const void*>(kernels)...}) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, k) != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) error of the query
      return -1;
    }
    if (attr.sharedSizeBytes != 0) return -2;
    version = attr.binaryVersion < version ? attr.binaryVersion : version;
  }
  return version;
}

// Why `what` (e.g. "the sm90 forward kernel") cannot run here ("" if it can): a compute
// capability 9.0 device and sm_90a code in the module. `code_version()` is the kernels' code
// version on this device (kernels_code_version).
template <typename CodeVersion>
std::string sm90_unavailable_reason(const char* what, CodeVersion code_version) {
  const std::string w(what);
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
  const int bin = code_version();
  if (bin == -2) return w + ": a kernel has static shared memory (a natten_jax build error)";
  if (bin != 90)
    return "natten_jax was built without sm_90a code for " + w + " (code version " +
           std::to_string(bin) + "); rebuild with NATTEN_JAX_CUDA_ARCHS including 90a";
  return "";
}

}  // namespace fna
}  // namespace natten_jax
