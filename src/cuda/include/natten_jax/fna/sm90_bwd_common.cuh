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

}  // namespace bwd
}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
