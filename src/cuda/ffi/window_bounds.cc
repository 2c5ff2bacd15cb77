// XLA FFI handler "natten_jax_window_bounds": per query token and spatial axis, the window
// (start, end) of window.cuh. Used by tests to compare the device window math with
// natten_jax/window.py.
//
// Result: int32 [*spatial, rank, 2] (rank 1..3; the spatial shape is read off the result).
// Attributes (int64 arrays, one entry per spatial axis): kernel_size, stride, dilation, is_causal.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "natten_jax/common/ffi_check.h"
#include "natten_jax/kernels/window_bounds.h"
#include "natten_jax/na_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natten_jax {
namespace {

// Copies one int64 attribute (one entry per spatial axis) into `dst`.
ffi::Error axis_attr(const char* name, ffi::Span<const int64_t> src, int rank, int* dst) {
  NJ_FFI_CHECK(static_cast<int>(src.size()) == rank,
               std::string("window_bounds: attribute ") + name + " has " +
                   std::to_string(src.size()) + " entries, expected one per spatial axis (" +
                   std::to_string(rank) + ")");
  for (int a = 0; a < rank; ++a) {
    NJ_FFI_CHECK(src[a] >= 0 && src[a] <= INT32_MAX,
                 std::string("window_bounds: attribute ") + name + " out of range");
    dst[a] = static_cast<int>(src[a]);
  }
  return ffi::Error::Success();
}

ffi::Error WindowBoundsImpl(cudaStream_t stream, ffi::Result<ffi::Buffer<ffi::S32>> out,
                            ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                            ffi::Span<const int64_t> dilation,
                            ffi::Span<const int64_t> is_causal) {
  const auto dims = out->dimensions();
  const int nd = static_cast<int>(dims.size());
  const int rank = nd - 2;
  NJ_FFI_CHECK(rank >= 1 && rank <= kMaxRank,
               "window_bounds: result must be [*spatial (1-3 axes), rank, 2]");
  NJ_FFI_CHECK(dims[nd - 2] == rank && dims[nd - 1] == 2,
               "window_bounds: result must be [*spatial, rank, 2]");

  NaAxes axes{};
  axes.rank = rank;
  int causal[kMaxRank] = {0, 0, 0};
  for (int a = 0; a < rank; ++a) {
    NJ_FFI_CHECK(dims[a] >= 1 && dims[a] <= INT32_MAX,
                 "window_bounds: spatial extents must be in [1, 2^31)");
    axes.extent[a] = static_cast<int>(dims[a]);
  }
  NJ_RETURN_IF_ERROR(axis_attr("kernel_size", kernel_size, rank, axes.kernel));
  NJ_RETURN_IF_ERROR(axis_attr("stride", stride, rank, axes.stride));
  NJ_RETURN_IF_ERROR(axis_attr("dilation", dilation, rank, axes.dilation));
  NJ_RETURN_IF_ERROR(axis_attr("is_causal", is_causal, rank, causal));
  for (int a = 0; a < rank; ++a) axes.causal[a] = causal[a] != 0;
  NJ_FFI_CHECK(axes.valid(),
               "window_bounds: need kernel_size >= 1, 1 <= stride <= kernel_size, dilation >= 1 "
               "and kernel_size * dilation <= extent on every axis");

  NJ_CUDA_CHECK(kernels::launch_window_bounds(axes, out->typed_data(), stream));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace natten_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxWindowBounds, natten_jax::WindowBoundsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()  // [*spatial, rank, 2]
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("stride")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<ffi::Span<const int64_t>>("is_causal"));
