// Fused neighborhood attention backward, Hopper path (sm_90a, wgmma): the two deterministic
// kernels of fna_bwd_sm80.cuh (same FnaBwdParams, tiles, outputs and conventions), with warpgroup
// MMAs, a producer warpgroup (predicated cp.async into 128-byte-swizzled stages, mbarriers) and
// setmaxnreg. Both recompute P = exp(scale Q K^T - lse) from the forward's logsumexp; delta =
// rowsum(dO * O) - d(lse) comes from the caller. No atomics: every output element is written by
// one thread, after a fixed-order accumulation.
//
// * dQ kernel (query-stationary, fna_bwd_sm90_dq.cuh): CTA = producer warpgroup + one consumer warpgroup owning a
//   64-query tile of one (batch, head, dilation group); two CTAs per SM. The producer loads Q and
//   dO once, then K and V of every KV box (64 keys) covering the union of the tile's windows.
//   Per box: S = Q K^T and dP = dO V^T (wgmma m64n64k16, all operands K-major in shared memory),
//   P and dS = P (dP - delta) in registers (masked where the box is not inside every window of
//   the warp's rows), dQ += dS K (wgmma m64nDk16, dS from registers, K as the MN-major B).
//   dQ = scale * acc, rows past the extent not written.
// * dK/dV kernel (key-stationary, fna_bwd_sm90_dkdv.cuh): CTA = producer warpgroup + two consumer warpgroups, one
//   64-key tile of one (batch, key/value head, dilation group), one CTA per SM. The producer
//   loads K and V once, then for each query head of the GQA group and each Q box (64 queries)
//   covering the tile's inverse neighborhood: Q, dO, and the rows' lse and delta (4-byte
//   cp.async). Consumer warpgroup w takes the boxes t = w, w + 2, ... (the stage count is even,
//   so stage s always belongs to warpgroup s % 2). Per box: S^T = K Q^T and dP^T = V dO^T
//   (m64n64k16, K-major), P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q (m64nDk16,
//   A from registers, dO / Q as MN-major B). The mask uses, per key row and axis, the interval of
//   queries whose windows contain the key (monotone window bounds: found once by binary search).
//   At the end the two warpgroups' partial sums are added through shared memory in a fixed
//   order (warpgroup 0 finishes dK, warpgroup 1 dV); dK = scale * acc.
//
// Head dims 64 and 128, fp16 / bf16. Built into every architecture's pass; the bodies hold code
// only in the sm_90a pass (elsewhere they trap; the host refuses other devices).
#pragma once

#include "natten_jax/fna/fna_bwd_sm90_dkdv.cuh"
#include "natten_jax/fna/fna_bwd_sm90_dq.cuh"
#include "natten_jax/fna/launch.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {
namespace bwd {

// The dQ kernel, then the dK/dV kernel (x: KV tiles, y: key/value heads x dilation groups, z:
// batch), on `stream`.
template <typename T, int D>
cudaError_t launch_backward(const FnaBwdParams& bp, cudaStream_t stream) {
  const FnaFwdParams& p = bp.f;
  cudaError_t err = launch_kernel(fna_bwd_dq_sm90_kernel<T, D>, q_tile_grid(p), DqConfig<D>::kThreads,
                                  DqConfig<D>::kSmemBytes, true, bp, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(bp.num_kv_tiles[0] * bp.num_kv_tiles[1] * bp.num_kv_tiles[2],
                  p.heads_kv * p.dilation[0] * p.dilation[1] * p.dilation[2], p.batch);
  return launch_kernel(fna_bwd_dkdv_sm90_kernel<T, D>, grid, DkvConfig<D>::kThreads,
                       DkvConfig<D>::kSmemBytes, true, bp, stream);
}

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
