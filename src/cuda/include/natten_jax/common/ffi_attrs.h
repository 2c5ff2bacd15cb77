// Handler bindings and attribute parsing shared by the XLA FFI handlers (ffi/unfused.cc,
// ffi/window_bounds.cc, ffi/fna.cc):
//
//   bind_stream()                  Ffi::Bind() with the CUDA stream as its context
//   bind_window_attrs<kStride>(b)  b with the per-axis window attributes appended: kernel_size,
//                                  stride (if kStride), dilation, is_causal (int64 arrays)
//   spatial_extents(...)           a buffer's spatial dimensions -> int[3], checked
//   axis_attr(...)                 one int64-per-axis attribute -> int[3], range-checked
//   window_attrs(...)              the window attributes -> int[3] each, checked against the
//                                  extents (the API contract of docs/API_CONTRACT.md)
//
// Per-axis arrays are rank 3, right-aligned: a rank-1 or rank-2 problem's leading axes get the
// neutral value (extent, kernel, stride and dilation 1, not causal), as every kernel expects.
// Failures are InvalidArgument errors naming the handler (`op`) and the attribute.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "natten_jax/common/ffi_check.h"
#include "xla/ffi/api/ffi.h"

namespace natten_jax {

using AxisAttr = xla::ffi::Span<const int64_t>;

inline auto bind_stream() {
  return xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>();
}

template <bool kStride, typename Binding>
auto bind_window_attrs(Binding&& b) {
  auto with_kernel = std::move(b).template Attr<AxisAttr>("kernel_size");
  if constexpr (kStride) {
    return std::move(with_kernel)
        .template Attr<AxisAttr>("stride")
        .template Attr<AxisAttr>("dilation")
        .template Attr<AxisAttr>("is_causal");
  } else {
    return std::move(with_kernel)
        .template Attr<AxisAttr>("dilation")
        .template Attr<AxisAttr>("is_causal");
  }
}

// dims[first, first + rank) (a buffer's spatial axes) into extent[3], each in [1, 2^31).
inline xla::ffi::Error spatial_extents(const char* op, xla::ffi::Span<const int64_t> dims,
                                       int first, int rank, int (&extent)[3]) {
  NJ_FFI_CHECK(rank >= 1 && rank <= 3 && first >= 0 &&
                   first + rank <= static_cast<int>(dims.size()),
               std::string(op) + ": operands need 1 to 3 spatial axes");
  for (int a = 0; a < 3 - rank; ++a) extent[a] = 1;
  for (int a = 0; a < rank; ++a) {
    const int64_t e = dims[first + a];
    NJ_FFI_CHECK(e >= 1 && e <= INT32_MAX,
                 std::string(op) + ": spatial extent " + std::to_string(e) + " of axis " +
                     std::to_string(a) + " outside [1, 2^31)");
    extent[3 - rank + a] = static_cast<int>(e);
  }
  return xla::ffi::Error::Success();
}

// Attribute `name` (one int64 per spatial axis) into dst[3]; leading axes get `fill`; every
// entry must lie in [lo, hi].
inline xla::ffi::Error axis_attr(const char* op, const char* name, AxisAttr src, int rank,
                                 int fill, int64_t lo, int64_t hi, int (&dst)[3]) {
  NJ_FFI_CHECK(static_cast<int>(src.size()) == rank,
               std::string(op) + ": attribute " + name + " has " + std::to_string(src.size()) +
                   " entries, expected one per spatial axis (" + std::to_string(rank) + ")");
  for (int a = 0; a < 3 - rank; ++a) dst[a] = fill;
  for (int a = 0; a < rank; ++a) {
    NJ_FFI_CHECK(src[a] >= lo && src[a] <= hi,
                 std::string(op) + ": attribute " + name + " is " + std::to_string(src[a]) +
                     " on axis " + std::to_string(a) + ", outside [" + std::to_string(lo) +
                     ", " + std::to_string(hi) + "]");
    dst[3 - rank + a] = static_cast<int>(src[a]);
  }
  return xla::ffi::Error::Success();
}

// kernel_size, stride (nullptr: 1 on every axis), dilation and is_causal of a problem with
// extents extent[3] into kernel, stride, dilation, causal (int[3] each), checked: kernel >= 1,
// 1 <= stride <= kernel, dilation >= 1, kernel * dilation <= extent, is_causal 0 or 1.
inline xla::ffi::Error window_attrs(const char* op, int rank, const int (&extent)[3],
                                    AxisAttr kernel_size, const AxisAttr* stride_attr,
                                    AxisAttr dilation_attr, AxisAttr is_causal, int (&kernel)[3],
                                    int (&stride)[3], int (&dilation)[3], int (&causal)[3]) {
  NJ_RETURN_IF_ERROR(axis_attr(op, "kernel_size", kernel_size, rank, 1, 1, INT32_MAX, kernel));
  if (stride_attr != nullptr) {
    NJ_RETURN_IF_ERROR(axis_attr(op, "stride", *stride_attr, rank, 1, 1, INT32_MAX, stride));
  } else {
    stride[0] = stride[1] = stride[2] = 1;
  }
  NJ_RETURN_IF_ERROR(axis_attr(op, "dilation", dilation_attr, rank, 1, 1, INT32_MAX, dilation));
  NJ_RETURN_IF_ERROR(axis_attr(op, "is_causal", is_causal, rank, 0, 0, 1, causal));
  for (int a = 0; a < 3; ++a) {
    NJ_FFI_CHECK(stride[a] <= kernel[a] &&
                     static_cast<int64_t>(kernel[a]) * dilation[a] <= extent[a],
                 std::string(op) + ": need 1 <= stride <= kernel_size and kernel_size * "
                                   "dilation <= extent on every axis (axis " +
                     std::to_string(a - (3 - rank)) + ": extent " + std::to_string(extent[a]) +
                     ", kernel_size " + std::to_string(kernel[a]) + ", stride " +
                     std::to_string(stride[a]) + ", dilation " + std::to_string(dilation[a]) +
                     ")");
  }
  return xla::ffi::Error::Success();
}

}  // namespace natten_jax
