// Host entry points of the sm_90a (Hopper, wgmma) fused forward kernel (fna_fwd_sm90.cuh).
// Same parameters and outputs as the sm80 kernel (fna_fwd_params.h); head dims 64 and 128.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"

namespace natten_jax {
namespace fna {

// Why the sm90 kernel cannot run `head_dim` / `dtype` on the current device ("" if it can): the
// device must have compute capability 9.0 and the module must hold sm_90a code.
std::string fna_forward_sm90_unavailable_reason(int head_dim, DType dtype);

// Launches the sm90 forward kernel on `stream` (Q tile of 64 or 128 queries, KV box 64).
cudaError_t fna_forward_sm90(const FnaFwdParams& params, DType dtype, cudaStream_t stream);

}  // namespace fna
}  // namespace natten_jax
