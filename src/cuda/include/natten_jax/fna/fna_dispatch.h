// Host entry points of the fused kernels (src/cuda/fna/*.cu), called by ffi/fna.cc once it has
// checked the call against kernel_table.h (so no entry point meets a combination it has no
// kernel for). Each launches on `stream` and returns the first CUDA error (attribute or launch).
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/fna_fwd_params.h"

namespace natten_jax {
namespace fna {

// sm80-class (mma.sync) kernels: every GPU from sm_80 on. `sm80_occupancy`: 0 or a variant of
// kernel_table.h (head dim 32, 64-query tiles).
cudaError_t fna_forward(const FnaFwdParams& params, DType dtype, int sm80_occupancy,
                        cudaStream_t stream);
cudaError_t fna_backward(const FnaBwdParams& params, DType dtype, cudaStream_t stream);

// sm_90a (wgmma) kernels: compute capability 9.0 devices with sm_90a code in the module.
cudaError_t fna_forward_sm90(const FnaFwdParams& params, DType dtype, cudaStream_t stream);
cudaError_t fna_backward_sm90(const FnaBwdParams& params, DType dtype, cudaStream_t stream);

// Why the sm90 forward / backward kernels of `head_dim` / `dtype` cannot run on the current
// device ("" if they can): the device must have compute capability 9.0 and the module sm_90a code.
std::string fna_forward_sm90_unavailable_reason(int head_dim, DType dtype);
std::string fna_backward_sm90_unavailable_reason(int head_dim, DType dtype);

}  // namespace fna
}  // namespace natten_jax
