// XLA FFI handlers of the fused neighborhood-attention forward and backward kernels.
//
// Attributes (names equal the Python kwargs): kernel_size, stride, dilation, is_causal (int64,
// one per spatial axis), q_tile, kv_tile (int64 log2 tile extents per axis), scale (f32),
// poison (int64; nonzero fills the outputs with NaN before the kernel runs, for tests), impl
// (int64: 0 the sm80 kernels, 1 the sm90 wgmma kernels), precision (int64, float32 inputs: 0
// logits by 3xTF32 and other products by one TF32 pass, 1 every product by 3xTF32; 16-bit
// inputs ignore it); the forward also takes sm80_occupancy
// (int64: 0 the default, else a variant of kernel_table.h). Both take an optional trailing
// operand after their tensors: valid_extent, int32 [batch, rank] (ragged batches).
//
// Every call is checked here against the shapes, the window rules and kernel_table.h before
// anything is launched: an unsupported combination is an InvalidArgument that names it.
#include <climits>
#include <cstdint>
#include <string>
#include <utility>

#include <cuda_runtime.h>

#include "natten_jax/common/ffi_attrs.h"
#include "natten_jax/common/ffi_check.h"
#include "natten_jax/fna/fna_dispatch.h"
#include "natten_jax/fna/kernel_table.h"
#include "natten_jax/neighborhood.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natten_jax {
namespace {

// A dimension of an operand as an int (the kernels index with 32-bit coordinates).
ffi::Error dim_as_int(int64_t d, const char* what, int& out) {
  NJ_FFI_CHECK(d >= 1 && d <= INT_MAX,
               std::string("fna: ") + what + " must be in [1, 2^31), got " + std::to_string(d));
  out = static_cast<int>(d);
  return ffi::Error::Success();
}

// Shapes, strides, attributes and dtype of q/k/v into `p` (everything but the data pointers
// of the outputs); the checks every entry point shares.
ffi::Error fill_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                       ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                       ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> is_causal,
                       ffi::Span<const int64_t> q_tile, ffi::Span<const int64_t> kv_tile,
                       float scale, fna::FnaFwdParams& p, fna::DType& dtype) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const int nd = static_cast<int>(qd.size());
  const int rank = nd - 3;
  NJ_FFI_CHECK(rank >= 1 && rank <= 3, "q must be [batch, *spatial(1-3), heads, head_dim]");
  NJ_FFI_CHECK(static_cast<int>(kd.size()) == nd && static_cast<int>(vd.size()) == nd,
               "q, k, v ranks differ");
  NJ_FFI_CHECK(q.element_type() == k.element_type() && q.element_type() == v.element_type(),
               "q, k, v dtypes differ");
  if (q.element_type() == ffi::DataType::F16) {
    dtype = fna::DType::kFloat16;
  } else if (q.element_type() == ffi::DataType::BF16) {
    dtype = fna::DType::kBFloat16;
  } else if (q.element_type() == ffi::DataType::F32) {
    dtype = fna::DType::kFloat32;
  } else {
    return ffi::Error::InvalidArgument(
        "natten_jax fna: dtype must be float16, bfloat16 or float32");
  }

  p = fna::FnaFwdParams{};
  int heads = 0, heads_kv = 0, stride_[3], dilation_[3];
  NJ_RETURN_IF_ERROR(dim_as_int(qd[0], "batch", p.batch));
  NJ_RETURN_IF_ERROR(dim_as_int(qd[nd - 2], "heads", heads));
  NJ_RETURN_IF_ERROR(dim_as_int(kd[nd - 2], "key/value heads", heads_kv));
  NJ_RETURN_IF_ERROR(dim_as_int(qd[nd - 1], "head_dim", p.head_dim));
  NJ_FFI_CHECK(kd[0] == qd[0] && vd[0] == qd[0], "q, k, v batch sizes differ");
  NJ_FFI_CHECK(kd[nd - 1] == p.head_dim && vd[nd - 1] == p.head_dim,
               "k and v head_dim must equal q head_dim");
  NJ_FFI_CHECK(vd[nd - 2] == heads_kv && heads % heads_kv == 0,
               "key/value heads must divide query heads");
  p.heads = FastDiv(heads);
  p.heads_kv = FastDiv(heads_kv);
  p.heads_per_kv = FastDiv(heads / heads_kv);
  for (int a = 0; a < rank; ++a)
    NJ_FFI_CHECK(kd[1 + a] == qd[1 + a] && vd[1 + a] == qd[1 + a], "q, k, v spatial shapes differ");
  NJ_RETURN_IF_ERROR(spatial_extents("fna", qd, 1, rank, p.extent));
  NJ_RETURN_IF_ERROR(window_attrs("fna", rank, p.extent, kernel_size, &stride, dilation,
                                  is_causal, p.kernel, stride_, dilation_, p.causal));
  NJ_RETURN_IF_ERROR(axis_attr("fna", "q_tile", q_tile, rank, 0, 0, 7, p.q_tile_log2));
  NJ_RETURN_IF_ERROR(axis_attr("fna", "kv_tile", kv_tile, rank, 0, 0, 7, p.kv_tile_log2));
  int64_t groups = 1;
  for (int a = 0; a < 3; ++a) {
    p.stride[a] = FastDiv(stride_[a]);
    p.dilation[a] = FastDiv(dilation_[a]);
    // Tiles per axis for the longest dilation group (group 0), the grid's extent.
    p.num_q_tiles[a] = FastDiv(tiles_covering(group_extent(p.extent[a], dilation_[a], 0),
                                              p.q_tile_log2[a]));
    groups *= dilation_[a];
  }
  NJ_FFI_CHECK(static_cast<int64_t>(p.num_q_tiles[0]) * p.num_q_tiles[1] * p.num_q_tiles[2] <=
                   INT_MAX,
               "too many query tiles for one launch");

  // Contiguous heads-last strides (in elements).
  const int64_t H = p.heads, Hkv = p.heads_kv, D = p.head_dim;
  int64_t tq = H * D, tkv = Hkv * D, tl = H;
  for (int a = 2; a >= 0; --a) {
    p.q_token_stride[a] = tq;
    p.kv_token_stride[a] = tkv;
    p.lse_token_stride[a] = tl;
    tq *= p.extent[a];
    tkv *= p.extent[a];
    tl *= p.extent[a];
  }
  p.q_batch_stride = tq;
  p.kv_batch_stride = tkv;
  p.lse_batch_stride = tl;
  p.q_head_stride = D;
  p.kv_head_stride = D;
  NJ_FFI_CHECK(p.batch <= 65535 && static_cast<int64_t>(p.heads) * groups <= 65535,
               "batch and heads x dilation groups must each be <= 65535");
  NJ_FFI_CHECK(scale > 0.f, "scale must be > 0");
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.scale_log2 = scale * 1.4426950408889634f;
  return ffi::Error::Success();
}

// The implementation a call names (attribute `impl`), checked against kernel_table.h and, for
// the sm90 kernels, against the device.
ffi::Error check_kernel(bool backward, int64_t impl, const fna::FnaFwdParams& p, fna::DType dtype,
                        int64_t occupancy, fna::Impl& out) {
  NJ_FFI_CHECK(impl == 0 || impl == 1, "fna: impl must be 0 (sm80 kernels) or 1 (sm90 kernels)");
  NJ_FFI_CHECK(occupancy >= 0 && occupancy <= 64, "fna: sm80_occupancy out of range");
  out = static_cast<fna::Impl>(impl);
  const int q_tokens = 1 << (p.q_tile_log2[0] + p.q_tile_log2[1] + p.q_tile_log2[2]);
  const int kv_tokens = 1 << (p.kv_tile_log2[0] + p.kv_tile_log2[1] + p.kv_tile_log2[2]);
  std::string why = fna::fna_kernel_unsupported(backward, out, p.head_dim, q_tokens, kv_tokens,
                                                static_cast<int>(occupancy),
                                                dtype == fna::DType::kFloat32);
  if (why.empty() && dtype == fna::DType::kFloat32) {
    int device = 0, major = 0;
    NJ_CUDA_CHECK(cudaGetDevice(&device));
    NJ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    why = fna::fna_float32_unsupported_on(p.head_dim, major);
  }
  if (why.empty() && out == fna::Impl::kSm90)
    why = backward ? fna::fna_backward_sm90_unavailable_reason(p.head_dim, dtype)
                   : fna::fna_forward_sm90_unavailable_reason(p.head_dim, dtype);
  if (!why.empty()) return ffi::Error::InvalidArgument("natten_jax fna: " + why);
  return ffi::Error::Success();
}

// The optional trailing operand of both handlers: int32 valid extents [batch, rank] of a ragged
// batch (absent: every sample spans the tensor). The kernels clamp each value to
// [kernel * dilation, extent] (neighborhood.cuh: sample_extent).
ffi::Error bind_valid_extent(const ffi::RemainingArgs& rest, int rank, fna::FnaFwdParams& p) {
  p.valid_extent = nullptr;
  p.valid_rank = 0;
  if (rest.size() == 0) return ffi::Error::Success();
  NJ_FFI_CHECK(rest.size() == 1, "fna: at most one operand (valid_extent) after the tensors");
  auto ve = rest.get<ffi::AnyBuffer>(0);
  if (!ve.has_value()) return ve.error();
  auto d = ve->dimensions();
  NJ_FFI_CHECK(ve->element_type() == ffi::DataType::S32 && d.size() == 2 && d[0] == p.batch &&
                   d[1] == rank,
               "fna: valid_extent must be int32 [batch, rank] = [" + std::to_string(p.batch) +
                   ", " + std::to_string(rank) + "]");
  p.valid_extent = static_cast<const int*>(ve->untyped_data());
  p.valid_rank = rank;
  return ffi::Error::Success();
}

// The attribute `precision` (float32 inputs: 0 "default", 1 "highest"; see FnaFwdParams).
ffi::Error bind_precision(int64_t precision, fna::FnaFwdParams& p) {
  NJ_FFI_CHECK(precision == 0 || precision == 1,
               "fna: precision must be 0 (default) or 1 (highest), got " +
                   std::to_string(precision));
  p.precision = static_cast<int>(precision);
  return ffi::Error::Success();
}

// Tests: fills an output with NaN (all bits set) so that an element a kernel fails to write shows.
ffi::Error poison_output(void* data, size_t bytes, cudaStream_t stream) {
  NJ_CUDA_CHECK(cudaMemsetAsync(data, 0xFF, bytes, stream));
  return ffi::Error::Success();
}

ffi::Error FnaForwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                          ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> is_causal,
                          ffi::Span<const int64_t> q_tile, ffi::Span<const int64_t> kv_tile,
                          float scale, int64_t poison, int64_t impl, int64_t precision,
                          int64_t sm80_occupancy) {
  fna::FnaFwdParams p;
  fna::DType dtype;
  fna::Impl kernel;
  NJ_RETURN_IF_ERROR(fill_params(q, k, v, kernel_size, stride, dilation, is_causal, q_tile,
                                 kv_tile, scale, p, dtype));
  NJ_RETURN_IF_ERROR(bind_valid_extent(rest, static_cast<int>(q.dimensions().size()) - 3, p));
  NJ_RETURN_IF_ERROR(bind_precision(precision, p));
  NJ_FFI_CHECK(o->element_type() == q.element_type() && o->element_count() == q.element_count(),
               "output must match q");
  NJ_FFI_CHECK(lse->element_count() == q.element_count() / p.head_dim,
               "lse must be [batch, *spatial, heads]");
  NJ_RETURN_IF_ERROR(check_kernel(false, impl, p, dtype, sm80_occupancy, kernel));
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  if (poison != 0) {
    NJ_RETURN_IF_ERROR(poison_output(p.o, o->size_bytes(), stream));
    NJ_RETURN_IF_ERROR(poison_output(p.lse, lse->size_bytes(), stream));
  }
  NJ_CUDA_CHECK(kernel == fna::Impl::kSm90
                    ? fna::fna_forward_sm90(p, dtype, stream)
                    : fna::fna_forward(p, dtype, static_cast<int>(sm80_occupancy), stream));
  return ffi::Error::Success();
}

ffi::Error FnaBackwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                           ffi::Buffer<ffi::F32> delta, ffi::RemainingArgs rest,
                           ffi::Result<ffi::AnyBuffer> dq,
                           ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                           ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                           ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> is_causal,
                           ffi::Span<const int64_t> q_tile, ffi::Span<const int64_t> kv_tile,
                           float scale, int64_t poison, int64_t impl, int64_t precision) {
  fna::FnaBwdParams bp{};
  fna::DType dtype;
  fna::Impl kernel;
  NJ_RETURN_IF_ERROR(fill_params(q, k, v, kernel_size, stride, dilation, is_causal, q_tile,
                                 kv_tile, scale, bp.f, dtype));
  NJ_RETURN_IF_ERROR(
      bind_valid_extent(rest, static_cast<int>(q.dimensions().size()) - 3, bp.f));
  NJ_RETURN_IF_ERROR(bind_precision(precision, bp.f));
  NJ_FFI_CHECK(dout.element_type() == q.element_type() && dq->element_type() == q.element_type() &&
                   dk->element_type() == q.element_type() &&
                   dv->element_type() == q.element_type(),
               "dout, dq, dk, dv dtypes must equal q dtype");
  NJ_FFI_CHECK(dout.element_count() == q.element_count() &&
                   lse.element_count() == q.element_count() / bp.f.head_dim &&
                   delta.element_count() == lse.element_count(),
               "dout must match q, and lse / delta must be [batch, *spatial, heads]");
  NJ_RETURN_IF_ERROR(check_kernel(true, impl, bp.f, dtype, 0, kernel));
  for (int a = 0; a < 3; ++a)
    bp.num_kv_tiles[a] = FastDiv(tiles_covering(
        group_extent(bp.f.extent[a], bp.f.dilation[a], 0), bp.f.kv_tile_log2[a]));
  bp.f.lse = const_cast<float*>(lse.typed_data());  // read only in the backward
  bp.dout = dout.untyped_data();
  bp.delta = delta.typed_data();
  bp.dq = dq->untyped_data();
  bp.dk = dk->untyped_data();
  bp.dv = dv->untyped_data();
  if (poison != 0) {
    NJ_RETURN_IF_ERROR(poison_output(bp.dq, dq->size_bytes(), stream));
    NJ_RETURN_IF_ERROR(poison_output(bp.dk, dk->size_bytes(), stream));
    NJ_RETURN_IF_ERROR(poison_output(bp.dv, dv->size_bytes(), stream));
  }
  NJ_CUDA_CHECK(kernel == fna::Impl::kSm90 ? fna::fna_backward_sm90(bp, dtype, stream)
                                           : fna::fna_backward(bp, dtype, stream));
  return ffi::Error::Success();
}

// The context and the q, k, v operands both handlers start with.
inline auto bind_qkv() {
  return bind_stream()
      .Arg<ffi::AnyBuffer>()   // query
      .Arg<ffi::AnyBuffer>()   // key
      .Arg<ffi::AnyBuffer>();  // value
}

// The attributes both handlers share, after their own buffers.
template <typename Binding>
auto fna_attrs(Binding b) {
  return bind_window_attrs<true>(std::move(b))
      .template Attr<AxisAttr>("q_tile")
      .template Attr<AxisAttr>("kv_tile")
      .template Attr<float>("scale")
      .template Attr<int64_t>("poison")
      .template Attr<int64_t>("impl")
      .template Attr<int64_t>("precision");
}

}  // namespace
}  // namespace natten_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxFnaForward, natten_jax::FnaForwardImpl,
                              natten_jax::fna_attrs(natten_jax::bind_qkv()
                                                        .RemainingArgs()  // [valid_extent]
                                                        .Ret<ffi::AnyBuffer>()           // output
                                                        .Ret<ffi::Buffer<ffi::F32>>())   // lse
                                  .Attr<int64_t>("sm80_occupancy"),
                              NJ_FFI_HANDLER_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxFnaBackward, natten_jax::FnaBackwardImpl,
                              natten_jax::fna_attrs(natten_jax::bind_qkv()
                                                        .Arg<ffi::AnyBuffer>()          // d(out)
                                                        .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                                        .Arg<ffi::Buffer<ffi::F32>>()   // delta
                                                        .RemainingArgs()  // [valid_extent]
                                                        .Ret<ffi::AnyBuffer>()          // dq
                                                        .Ret<ffi::AnyBuffer>()          // dk
                                                        .Ret<ffi::AnyBuffer>()),        // dv
                              NJ_FFI_HANDLER_TRAITS);
