// TMA (bulk tensor copy) loads of the sm90 forward's KV boxes: the tensor maps of K and V built
// on the host, and the producer that issues one copy per 64-column block of K and of V per box,
// completing on the stage's `full` mbarrier by transaction count.
//
// Used by the 128-query, 128-key-box kernel (3-4% faster than its cp.async producer on the
// H200: docs/perf-log.md), and only where the cp.async producer's zero fill is not needed for
// exactness: dilation 1 on every axis (a dilation group is the whole axis, so a box overhangs
// only the tensor's edge, which TMA fills with zeros) and no ragged batch (TMA would read a
// sample's padding). Rows of a box inside the tensor but outside the tile's window union are
// loaded, not zeroed; they are masked (P = 0), so only a non-finite V there changes a result
// (0 * inf), as in FlashAttention-3 and NATTEN.
//
// Tensor map of K (V alike), heads-last [B, e0, e1, e2, Hkv, D] folded to 5 dimensions,
// innermost first: (Hkv * D, e2, e1, e0, B); box (64, 2^l2, 2^l1, 2^l0, 1); 128-byte swizzle.
// A box lands as 2^(l0+l1+l2) rows of 128 bytes in tile_coord order (axis 2 fastest), each
// row's 16-byte chunks XOR-swizzled by the row's index mod 8: the layout the wgmma descriptors
// of sm90_common.cuh read.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/q_tile.cuh"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/sm90_tile_io.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {

// The forward's kernel parameters with the tensor maps of K and V.
struct FwdTmaArgs {
  FnaFwdParams p;
  CUtensorMap k, v;
};

__host__ __device__ inline const FnaFwdParams& params_of(const FnaFwdParams& p) { return p; }
__host__ __device__ inline const FnaFwdParams& params_of(const FwdTmaArgs& a) { return a.p; }

// Whether a call can take the TMA producer (see above).
inline bool tma_eligible(const FnaFwdParams& p) {
  return p.valid_extent == nullptr && p.dilation[0] == 1 && p.dilation[1] == 1 &&
         p.dilation[2] == 1;
}

// ---- Device side.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if NJ_SM90A
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
#endif
}

// One 5-D tile copy global -> shared, completing `bar` by its byte count.
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3, int c4) {
#if NJ_SM90A
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(c4)
      : "memory");
#endif
}

// Producer (one thread, pt == 0; the others return): K and V of every KV box of query tile c,
// in the consumers' order, into a ring of kStages stages (stage s at stage0 + s * kStageBytes:
// K, then V kVOffset bytes further; column blocks of kBoxKeys rows, kBoxKeys * 128 bytes apart).
template <int D, int kStages, int kStageBytes, int kVOffset, int kBoxKeys>
__device__ __forceinline__ void produce_kv_boxes_tma(const FwdTmaArgs& a, const QTileWork& c,
                                                     int pt, uint32_t stage0, uint32_t bar_full,
                                                     uint32_t bar_empty) {
  if (pt != 0) return;
  constexpr int kBlockBytes = kBoxKeys * kRowBytes;
  const int col0 = c.hkv * D;
  for_each_box<kStages>(c, [&](int stage, uint32_t phase, const int (&o)[3]) {
    mbar_wait(bar_empty + 8 * stage, phase ^ 1);
    const uint32_t full = bar_full + 8 * stage;
    mbar_arrive_expect_tx(full, 2 * D * kBoxKeys * 2);  // K and V of the box, 16-bit elements
    const uint32_t ks = stage0 + stage * kStageBytes;
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
      tma_load_5d(ks + cb * kBlockBytes, &a.k, full, col0 + 64 * cb, o[2], o[1], o[0], c.b);
      tma_load_5d(ks + kVOffset + cb * kBlockBytes, &a.v, full, col0 + 64 * cb, o[2], o[1], o[0],
                  c.b);
    }
  });
}

// ---- Host side: the tensor maps of K and V for p's tiles (cuTensorMapEncodeTiled through the
// runtime's driver entry point, so the module does not link libcuda). cudaErrorNotSupported
// where the driver lacks the entry point.
cudaError_t encode_kv_maps(const FnaFwdParams& p, DType dtype, CUtensorMap* k, CUtensorMap* v);

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
