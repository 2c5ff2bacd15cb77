// Plain parameters and host entry points of the unfused neighborhood-attention operators
// (NATTEN < 0.20's "PN", "NN" and "IN" operators and the RPB gradient), heads-last layout.
//
// Every problem is viewed as rank 3: a rank-1 or rank-2 problem gets leading axes of extent 1,
// kernel 1, dilation 1 (such an axis has the single window [0, 1)), which leaves the flat
// neighbor index j = ((j0 * k1) + j1) * k2 + j2 and the flat RPB index unchanged. Tokens are
// flattened row-major over the spatial axes (T of them); stride is always 1 here.
//
//   PN  out[b, x, h, j] = scale * sum_c a[b, x, h, c] * bm[b, key(x, j), h / G, c]
//                          (+ rpb[h, r(x, j)]);  `fill` where j is no neighbor (causal)
//   NN  out[b, x, h, c] = scale * sum_{valid j} w[b, x, h, j] * bm[b, key(x, j), h / G, c]
//   IN  out[b, y, hk, c] = scale * sum_{g < G} sum_{x: y = key(x, j)} w[b, x, hk*G+g, j]
//                                                                 * bm[b, x, hk*G+g, c]
//   RPB grad partial[chunk, h, r] = sum_b sum_{x in chunk} sum_{j: r(x, j) = r} w[b, x, h, j]
//
// G = heads / heads_kv. Accumulation is in fp32; inputs and outputs share one dtype (the RPB
// table and the RPB-gradient partials are fp32).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace natten_jax {
namespace unfused {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct UnfusedParams {
  int batch;
  int heads;     // H: heads of the [B, T, H, *] operands (queries / attention weights)
  int heads_kv;  // Hkv: heads of the key/value-side operand (PN, NN: bm; IN: out)
  int dim;       // C: feature dim of the dense operands and (NN, IN) of the output
  int window;    // W = kernel[0] * kernel[1] * kernel[2]
  int extent[3], kernel[3], dilation[3], causal[3];

  const void* a;     // PN: [B, T, H, C]; NN, IN: weights w [B, T, H, W]
  const void* bm;    // PN, NN: [B, T, Hkv, C]; IN: [B, T, H, C]
  const float* rpb;  // PN only: [H, (2k0-1)(2k1-1)(2k2-1)] or nullptr
  void* out;         // PN: [B, T, H, W]; NN: [B, T, H, C]; IN: [B, T, Hkv, C]; RPB: fp32
  float scale;       // multiplies the sums (PN: before the bias is added)
  float fill;        // PN: value of entries that are no neighbor (-inf or 0)
  int rpb_chunks;    // RPB grad: number of token chunks of the partial sums
};

// Tokens per chunk of the RPB-gradient partial sums (the Python side sizes the partial buffer
// as ceil(T / kRpbChunkTokens) chunks).
constexpr int kRpbChunkTokens = 64;

// Naive kernels: one thread per output element.
cudaError_t naive_pn(const UnfusedParams& p, DType dtype, cudaStream_t stream);
cudaError_t naive_nn(const UnfusedParams& p, DType dtype, cudaStream_t stream);
cudaError_t naive_in(const UnfusedParams& p, DType dtype, cudaStream_t stream);
cudaError_t rpb_grad_partials(const UnfusedParams& p, DType dtype, cudaStream_t stream);

// GEMM-based kernels (space-aware tiles, tensor cores for fp16/bf16, FFMA for fp32). They
// return cudaErrorNotSupported, launching nothing, when a problem does not fit their shared
// memory (the caller then runs the naive kernel).
cudaError_t gemm_pn(const UnfusedParams& p, DType dtype, cudaStream_t stream);
cudaError_t gemm_nn(const UnfusedParams& p, DType dtype, cudaStream_t stream);
cudaError_t gemm_in(const UnfusedParams& p, DType dtype, cudaStream_t stream);

}  // namespace unfused
}  // namespace natten_jax
