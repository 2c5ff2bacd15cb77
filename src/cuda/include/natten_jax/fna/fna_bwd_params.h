// Plain parameters of the fused neighborhood-attention backward kernels.
#pragma once

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"

namespace natten_jax {
namespace fna {

struct FnaBwdParams {
  // q, k, v, the forward's logsumexp (`lse`, read), shapes, strides, scale. Tiles: q_tile_log2
  // is the Q tile of the dQ kernel and the Q box of the dK/dV kernel (64 tokens); kv_tile_log2
  // the KV box of the dQ kernel and the KV tile of the dK/dV kernel (64 tokens).
  FnaFwdParams f;
  const void* dout;     // [B, *S, H, D], layout of q
  const float* delta;   // [B, *S, H], layout of lse: rowsum(dO * O) - d(lse)
  void* dq;             // layout of q
  void* dk;             // layout of k
  void* dv;             // layout of v
  FastDiv num_kv_tiles[3];  // KV tiles per axis for dilation group 0 (grid of the dK/dV kernel)
};

}  // namespace fna
}  // namespace natten_jax
