// The query tile a CTA of the forward and dQ kernels owns (sm80 and sm90 alike): its (batch,
// head, dilation group), the group's window rules, the tile origin and the KV range it visits,
// i.e. the union of its queries' windows in boxes of the KV tile shape (neighborhood policy).
#pragma once

#include <cuda_runtime.h>

#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/neighborhood.cuh"

namespace natten_jax {
namespace fna {

struct QTileWork {
  int b, h, hkv;
  Neighborhood nb;            // the CTA's dilation group and its window rules
  int q0[3];                  // tile origin (in-group)
  int ql[3], kl[3];           // log2 extents of the Q tile and of a KV box
  int lo[3], hi[3], nbox[3];  // union of the tile's windows [lo, hi) and KV boxes per axis
  int total;                  // KV boxes

  // From the block index (x: Q tile, y: head x dilation group, z: batch). False if the tile
  // lies past the end of its dilation group (groups can be one token shorter than group 0, for
  // which the grid is sized): the CTA has nothing to do.
  __device__ __forceinline__ bool init(const FnaFwdParams& p) {
    b = blockIdx.z;
    h = blockIdx.y % p.heads;
    hkv = h / (p.heads / p.heads_kv);
    nb = Neighborhood(p.extent, p.kernel, p.stride, p.dilation, p.causal, blockIdx.y / p.heads);
    tile_origin(blockIdx.x, p.num_q_tiles, p.q_tile_log2, q0);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ql[a] = p.q_tile_log2[a];
      kl[a] = p.kv_tile_log2[a];
    }
    if (q0[0] >= nb.glen[0] || q0[1] >= nb.glen[1] || q0[2] >= nb.glen[2]) return false;
    total = 1;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const Interval u = nb.window_union(a, q0[a], nb.tile_last(a, q0[a], ql[a]));
      lo[a] = u.lo;
      hi[a] = u.hi;
      nbox[a] = tiles_covering(u.hi - u.lo, kl[a]);
      total *= nbox[a];
    }
    return true;
  }

  // Origin (in-group) of the KV box with per-axis box indices bi.
  __device__ __forceinline__ void box_origin(const int (&bi)[3], int (&o)[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) o[a] = lo[a] + (bi[a] << kl[a]);
  }
};

}  // namespace fna
}  // namespace natten_jax
