// Window bounds of every query token: a small kernel that exposes window.cuh to tests.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "natten_jax/na_params.h"

namespace natten_jax {
namespace kernels {

// Writes, for every token of the spatial shape `axes.extent[0:rank]` (row-major, last axis
// fastest), per axis a its window (start, end) as in-group indices:
//   out[token * rank * 2 + a * 2 + 0] = start, ... + 1] = end
// i.e. an int32 array [*spatial, rank, 2]. `axes` must be valid(). Asynchronous on `stream`;
// returns the launch error, if any.
cudaError_t launch_window_bounds(const NaAxes& axes, int32_t* out, cudaStream_t stream);

}  // namespace kernels
}  // namespace natten_jax
