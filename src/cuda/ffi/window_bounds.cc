// XLA FFI handler "natten_jax_window_bounds", the test target of the window math and the
// neighborhood policy: per token and spatial axis, the fields of
// natten_jax/kernels/window_bounds.h (the token's window, the inverse neighborhood of the token
// as a key, union and intersection of the windows of its query tile), for tests to compare with
// natten_jax/window.py.
//
// Result: int32 [*spatial, rank, 8] (rank 1..3; the spatial shape is read off the result).
// Attributes (int64 arrays, one entry per spatial axis): kernel_size, stride, dilation,
// is_causal, tile_log2 (query tile extents 2^tile_log2, 0..16).
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "natten_jax/common/ffi_attrs.h"
#include "natten_jax/common/ffi_check.h"
#include "natten_jax/kernels/window_bounds.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natten_jax {
namespace {

constexpr const char* kOp = "window_bounds";

ffi::Error WindowBoundsImpl(cudaStream_t stream, ffi::Result<ffi::Buffer<ffi::S32>> out,
                            AxisAttr kernel_size, AxisAttr stride, AxisAttr dilation,
                            AxisAttr is_causal, AxisAttr tile_log2) {
  const auto dims = out->dimensions();
  const int rank = static_cast<int>(dims.size()) - 2;
  NJ_FFI_CHECK(rank >= 1 && rank <= 3 && dims[rank] == rank &&
                   dims[rank + 1] == kernels::kWindowBoundsFields,
               "window_bounds: result must be int32 [*spatial (1-3 axes), rank, 8]");
  kernels::WindowBoundsParams p{};
  p.rank = rank;
  NJ_RETURN_IF_ERROR(spatial_extents(kOp, dims, 0, rank, p.extent));
  NJ_RETURN_IF_ERROR(window_attrs(kOp, rank, p.extent, kernel_size, &stride, dilation, is_causal,
                                  p.kernel, p.stride, p.dilation, p.causal));
  NJ_RETURN_IF_ERROR(axis_attr(kOp, "tile_log2", tile_log2, rank, 0, 0, 16, p.tile_log2));
  NJ_CUDA_CHECK(kernels::launch_window_bounds(p, out->typed_data(), stream));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace natten_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NattenJaxWindowBounds, natten_jax::WindowBoundsImpl,
    natten_jax::bind_window_attrs<true>(
        natten_jax::bind_stream().Ret<ffi::Buffer<ffi::S32>>())  // [*spatial, rank, 8]
        .Attr<natten_jax::AxisAttr>("tile_log2"));
