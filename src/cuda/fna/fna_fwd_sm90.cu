// Instantiations, availability check and dispatch of the sm_90a fused forward kernel: head dims
// of kernel_table.h x {one consumer warpgroup (64-query tiles) with 64-key boxes, two (128-query
// tiles) with 64- or 128-key boxes}.
//
// Built for every architecture of the module; the kernel bodies hold code only in the sm_90a
// pass (elsewhere they trap), and ffi/fna.cc refuses to start them on anything but a compute
// capability 9.0 device running sm_90a code (fna_forward_sm90_unavailable_reason).
#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/fna_fwd_sm90.cuh"
#include "natten_jax/fna/launch.cuh"
#include "natten_jax/fna/sm90_availability.h"

#include <cudaTypedefs.h>

namespace natten_jax {
namespace fna {

std::string fna_forward_sm90_unavailable_reason(int head_dim, DType dtype) {
  return sm90_unavailable_reason("the sm90 forward kernel", [&] {
    return dispatch_kernel<Impl::kSm90>(dtype, head_dim, -1, [](auto t, auto d) {
      using T = typename decltype(t)::type;
      constexpr int D = decltype(d)::value;
      return kernels_code_version(
          sm90::fna_fwd_sm90_kernel<T, D, 1, 64>, sm90::fna_fwd_sm90_kernel<T, D, 2, 64>,
          sm90::fna_fwd_sm90_kernel<T, D, 2, 128>,
          sm90::fna_fwd_sm90_kernel<T, D, 2, 128, sm90::FwdTmaArgs>);
    });
  });
}

cudaError_t fna_forward_sm90(const FnaFwdParams& p, DType dtype, cudaStream_t stream) {
  const bool q64 = p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2] == 6;
  const bool kv128 = p.kv_tile_log2[0] + p.kv_tile_log2[1] + p.kv_tile_log2[2] == 7;
  return dispatch_kernel<Impl::kSm90>(dtype, p.head_dim, cudaErrorInvalidValue, [&](auto t, auto d) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value;
    if (q64) return sm90::launch<T, D, 1, 64>(p, stream);
    if (kv128 && sm90::tma_eligible(p)) {  // TMA loads of the KV boxes: sm90_tma.cuh
      sm90::FwdTmaArgs a;
      a.p = p;
      if (sm90::encode_kv_maps(p, dtype, &a.k, &a.v) == cudaSuccess)
        return sm90::launch_tma<T, D>(a, stream);
      cudaGetLastError();  // no TMA maps here: the cp.async producer
    }
    return kv128 ? sm90::launch<T, D, 2, 128>(p, stream) : sm90::launch<T, D, 2, 64>(p, stream);
  });
}

namespace sm90 {

cudaError_t encode_kv_maps(const FnaFwdParams& p, DType dtype, CUtensorMap* k, CUtensorMap* v) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const CUtensorMapDataType type = dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                             : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t hd = static_cast<cuuint64_t>(p.heads_kv) * p.head_dim;
  const cuuint64_t dims[5] = {hd, static_cast<cuuint64_t>(p.extent[2]),
                              static_cast<cuuint64_t>(p.extent[1]),
                              static_cast<cuuint64_t>(p.extent[0]),
                              static_cast<cuuint64_t>(p.batch)};
  cuuint64_t strides[4];  // bytes, of dims 1..4
  strides[0] = hd * 2;
  for (int i = 1; i < 4; ++i) strides[i] = strides[i - 1] * dims[i];
  const cuuint32_t box[5] = {64, 1u << p.kv_tile_log2[2], 1u << p.kv_tile_log2[1],
                             1u << p.kv_tile_log2[0], 1};
  const cuuint32_t elem[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < 2; ++i) {
    CUresult r = encode(i == 0 ? k : v, type, 5, const_cast<void*>(i == 0 ? p.k : p.v), dims,
                        strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace sm90
}  // namespace fna
}  // namespace natten_jax
