// Plain parameters of the fused neighborhood-attention forward kernel (host <-> device ABI).
//
// Every problem is viewed as rank 3: a rank-1 or rank-2 problem gets leading axes of extent 1,
// kernel 1, stride 1, dilation 1 (such an axis has the single window [0, 1)).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "natten_jax/fast_div.h"

namespace natten_jax {
namespace fna {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct FnaFwdParams {
  const void* q;  // [B, *S, H, D]
  const void* k;  // [B, *S, Hkv, D]
  const void* v;  // [B, *S, Hkv, D]
  void* o;        // [B, *S, H, D]
  float* lse;     // [B, *S, H] (natural log)

  // The kernels divide their block index and in-group coordinates by the FastDiv fields
  // (fast_div.h: multiply-shift divisors, built on the host); each converts to its int value.
  int batch, head_dim;
  FastDiv heads, heads_kv;
  FastDiv heads_per_kv;  // heads / heads_kv: query heads per key/value head (GQA)
  int extent[3], kernel[3];
  FastDiv stride[3], dilation[3];
  int causal[3];

  // Q and KV tiles: 2^log2 tokens per axis; Q tiles hold 64 or 128 tokens, KV boxes 64.
  int q_tile_log2[3], kv_tile_log2[3];
  FastDiv num_q_tiles[3];  // per axis, for dilation group 0 (the longest)

  // Element strides (contiguous heads-last tensors; computed on the host).
  int64_t q_batch_stride, q_token_stride[3], q_head_stride;
  int64_t kv_batch_stride, kv_token_stride[3], kv_head_stride;  // shared by k and v
  int64_t lse_batch_stride, lse_token_stride[3];                // heads contiguous

  float scale_log2;  // scale * log2(e)

  // Ragged batches: int32 [batch, valid_rank] per-sample extents of the last valid_rank axes
  // (clamped in the kernels: neighborhood.cuh's sample_extent), or null (every sample spans
  // `extent`).
  const int* valid_extent;
  int valid_rank;

  // float32 inputs (TF32 products): 0 logits by 3xTF32, other products one TF32 pass (JAX's
  // "default"); 1 every product by 3xTF32 ("highest"). Ignored for 16-bit inputs.
  int precision;
};

}  // namespace fna
}  // namespace natten_jax
