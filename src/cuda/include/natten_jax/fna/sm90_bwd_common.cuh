// Shared definitions of the sm_90a fused backward kernels (fna_bwd_sm90_dq.cuh,
// fna_bwd_sm90_dkdv.cuh): tile sizes and includes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/sm90_common.cuh"
#include "natten_jax/fna/sm90_gemm.cuh"
#include "natten_jax/fna/sm90_tile_io.cuh"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {
namespace sm90 {
namespace bwd {

constexpr int kTile = 64;  // queries per Q tile / box, keys per KV box / tile
constexpr int kWG = kWGThreads;
constexpr int kBlockBytes = kTile * kRowBytes;  // one 64-row column block (8 KB)
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory and registers of a backward kernel: a producer and kConsumers consumer
// warpgroups, kMinBlocks CTAs per SM; two resident 64-row tiles (at 0 and kTileBytes), a ring of
// kStages stages from kStageOff (two tiles each, then kStageExtra bytes), the consumers'
// per-thread query intervals (2 rows x 3 axes x (lo, hi) ints as [12][2 * kWG]: read only on
// boxes that need a mask, kept out of registers) at kIvOff, and the mbarriers at kBarOff.
template <int D, int kConsumers, int kMinBlocks_, int kStages_, int kStageExtra,
          int kProducerRegs_, int kConsumerRegs_>
struct BwdLayout {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kThreads = (1 + kConsumers) * kWG;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kTileBytes = kTile * D * 2;
  static constexpr int kStages = kStages_;
  static constexpr int kStageOff = 2 * kTileBytes;
  static constexpr int kStageBytes = 2 * kTileBytes + kStageExtra;
  static constexpr int kIvOff = kStageOff + kStages * kStageBytes;
  static constexpr int kBarOff = kIvOff + 12 * 2 * kWG * 4;
  static constexpr int kSmemBytes = kBarOff + (2 * kStages + 1) * 8;
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static_assert(kProducerRegs * kWG + kConsumers * kConsumerRegs * kWG <=
                    (65536 / kMinBlocks / kThreads) / 8 * 8 * kThreads,
                "register reallocation exceeds the launch budget");
  static_assert(kMinBlocks * (kSmemBytes + 1024) <= 233472, "shared memory per SM");
};

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
