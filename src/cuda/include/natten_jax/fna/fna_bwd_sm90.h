// Host entry points of the sm_90a (Hopper, wgmma) fused backward kernels (fna_bwd_sm90.cuh).
// Same parameters, outputs and conventions as the sm80 backward (fna_bwd_params.h); head dims 64
// and 128.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_bwd_params.h"

namespace natten_jax {
namespace fna {

// Why the sm90 backward cannot run `head_dim` / `dtype` on the current device ("" if it can):
// the device must have compute capability 9.0 and the module must hold sm_90a code.
std::string fna_backward_sm90_unavailable_reason(int head_dim, DType dtype);

// Launches the sm90 dQ kernel and dK/dV kernel on `stream` (Q tile / box 64, KV box / tile 64).
cudaError_t fna_backward_sm90(const FnaBwdParams& params, DType dtype, cudaStream_t stream);

}  // namespace fna
}  // namespace natten_jax
