// Token coordinates inside a multi-dimensional tile, shared by every fused kernel (sm80, sm90).
#pragma once

#include <cuda_runtime.h>

namespace natten_jax {
namespace fna {

// Local coordinates of row `r` of a 3-D tile of 2^l[0] x 2^l[1] x 2^l[2] tokens (row-major).
__device__ __forceinline__ void tile_coord(int r, const int* l, int* c) {
  c[2] = r & ((1 << l[2]) - 1);
  c[1] = (r >> l[2]) & ((1 << l[1]) - 1);
  c[0] = r >> (l[1] + l[2]);
}

}  // namespace fna
}  // namespace natten_jax
