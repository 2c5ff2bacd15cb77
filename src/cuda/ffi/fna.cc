// XLA FFI handlers of the fused neighborhood-attention forward and backward kernels.
//
// Attributes (names equal the Python kwargs): kernel_size, stride, dilation, is_causal (int64,
// one per spatial axis), q_tile, kv_tile (int64 log2 tile extents per axis), scale (f32),
// poison (int64; nonzero fills the outputs with NaN before the kernel runs, for tests); the
// forward and the backward also take impl (int64: 0 the sm80 kernels, 1 the sm90 wgmma kernels).
#include <cmath>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "natten_jax/common/ffi_check.h"
#include "natten_jax/fna/fna_bwd_params.h"
#include "natten_jax/fna/fna_bwd_sm90.h"
#include "natten_jax/fna/fna_fwd_params.h"
#include "natten_jax/fna/fna_fwd_sm90.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natten_jax {
namespace {

// Fills `dst[3]` with `src` right-aligned (leading axes get `fill`).
ffi::Error pad3(const char* name, ffi::Span<const int64_t> src, int rank, int fill, int* dst) {
  if (static_cast<int>(src.size()) != rank)
    return ffi::Error::InvalidArgument(std::string("natten_jax fna: attribute ") + name +
                                       " must have one entry per spatial axis");
  for (int a = 0; a < 3 - rank; ++a) dst[a] = fill;
  for (int a = 0; a < rank; ++a) dst[3 - rank + a] = static_cast<int>(src[a]);
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
  } else {
    return ffi::Error::InvalidArgument("natten_jax fna: dtype must be float16 or bfloat16");
  }

  p = fna::FnaFwdParams{};
  p.batch = static_cast<int>(qd[0]);
  p.heads = static_cast<int>(qd[nd - 2]);
  p.heads_kv = static_cast<int>(kd[nd - 2]);
  p.head_dim = static_cast<int>(qd[nd - 1]);
  NJ_FFI_CHECK(kd[nd - 1] == p.head_dim && vd[nd - 1] == p.head_dim,
               "k and v head_dim must equal q head_dim");
  NJ_FFI_CHECK(vd[nd - 2] == p.heads_kv && p.heads_kv > 0 && p.heads % p.heads_kv == 0,
               "key/value heads must divide query heads");
  NJ_FFI_CHECK(fna::fna_forward_supports_head_dim(p.head_dim), "head_dim must be 32, 64 or 128");
  for (int a = 0; a < 3 - rank; ++a) p.extent[a] = 1;
  for (int a = 0; a < rank; ++a) {
    NJ_FFI_CHECK(kd[1 + a] == qd[1 + a] && vd[1 + a] == qd[1 + a], "q, k, v spatial shapes differ");
    p.extent[3 - rank + a] = static_cast<int>(qd[1 + a]);
  }
  NJ_RETURN_IF_ERROR(pad3("kernel_size", kernel_size, rank, 1, p.kernel));
  NJ_RETURN_IF_ERROR(pad3("stride", stride, rank, 1, p.stride));
  NJ_RETURN_IF_ERROR(pad3("dilation", dilation, rank, 1, p.dilation));
  NJ_RETURN_IF_ERROR(pad3("is_causal", is_causal, rank, 0, p.causal));
  NJ_RETURN_IF_ERROR(pad3("q_tile", q_tile, rank, 0, p.q_tile_log2));
  NJ_RETURN_IF_ERROR(pad3("kv_tile", kv_tile, rank, 0, p.kv_tile_log2));
  int qsum = 0, kvsum = 0;
  for (int a = 0; a < 3; ++a) {
    qsum += p.q_tile_log2[a];
    kvsum += p.kv_tile_log2[a];
    NJ_FFI_CHECK(p.kernel[a] >= 1 && p.kernel[a] * p.dilation[a] <= p.extent[a] &&
                     p.stride[a] >= 1 && p.stride[a] <= p.kernel[a],
                 "invalid kernel_size / stride / dilation for the input extent");
    NJ_FFI_CHECK(p.q_tile_log2[a] >= 0 && p.kv_tile_log2[a] >= 0, "tile extents must be >= 1");
    int group0 = (p.extent[a] + p.dilation[a] - 1) / p.dilation[a];
    int tq = 1 << p.q_tile_log2[a];
    p.num_q_tiles[a] = (group0 + tq - 1) / tq;
  }
  NJ_FFI_CHECK((qsum == 6 || qsum == 7) && kvsum == 6,
               "q_tile must hold 64 or 128 tokens and kv_tile 64");

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
  NJ_FFI_CHECK(p.batch <= 65535 && static_cast<int64_t>(p.heads) * p.dilation[0] *
                                           p.dilation[1] * p.dilation[2] <=
                                       65535,
               "batch and heads x dilation groups must each be <= 65535");
  NJ_FFI_CHECK(scale > 0.f, "scale must be > 0");
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.scale_log2 = scale * 1.4426950408889634f;
  return ffi::Error::Success();
}

ffi::Error FnaForwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                          ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> is_causal,
                          ffi::Span<const int64_t> q_tile, ffi::Span<const int64_t> kv_tile,
                          float scale, int64_t poison, int64_t impl) {
  fna::FnaFwdParams p;
  fna::DType dtype;
  NJ_RETURN_IF_ERROR(fill_params(q, k, v, kernel_size, stride, dilation, is_causal, q_tile,
                                 kv_tile, scale, p, dtype));
  NJ_FFI_CHECK(o->element_type() == q.element_type(), "output dtype must equal q dtype");
  // ---- impl (sm90 hook): which forward kernel; the sm90 one refuses other devices clearly.
  NJ_FFI_CHECK(impl == 0 || impl == 1, "impl must be 0 (sm80 kernel) or 1 (sm90 kernel)");
  if (impl == 1) {
    const std::string why = fna::fna_forward_sm90_unavailable_reason(p.head_dim, dtype);
    if (!why.empty()) return ffi::Error::InvalidArgument("natten_jax fna (impl sm90): " + why);
  }
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  if (poison != 0) {  // tests: fill outputs with NaN so that an unwritten element shows
    NJ_CUDA_CHECK(cudaMemsetAsync(p.o, 0xFF, o->size_bytes(), stream));
    NJ_CUDA_CHECK(cudaMemsetAsync(p.lse, 0xFF, lse->size_bytes(), stream));
  }
  if (impl == 1) {
    NJ_CUDA_CHECK(fna::fna_forward_sm90(p, dtype, stream));
    return ffi::Error::Success();
  }
  NJ_CUDA_CHECK(fna::fna_forward(p, dtype, stream));
  return ffi::Error::Success();
}

ffi::Error FnaBackwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                           ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::AnyBuffer> dq,
                           ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                           ffi::Span<const int64_t> kernel_size, ffi::Span<const int64_t> stride,
                           ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> is_causal,
                           ffi::Span<const int64_t> q_tile, ffi::Span<const int64_t> kv_tile,
                           float scale, int64_t poison, int64_t impl) {
  fna::FnaBwdParams bp{};
  fna::DType dtype;
  NJ_RETURN_IF_ERROR(fill_params(q, k, v, kernel_size, stride, dilation, is_causal, q_tile,
                                 kv_tile, scale, bp.f, dtype));
  NJ_FFI_CHECK(bp.f.q_tile_log2[0] + bp.f.q_tile_log2[1] + bp.f.q_tile_log2[2] == 6,
               "the backward's q_tile must hold 64 tokens");
  NJ_FFI_CHECK(dout.element_type() == q.element_type() && dq->element_type() == q.element_type() &&
                   dk->element_type() == q.element_type() &&
                   dv->element_type() == q.element_type(),
               "dout, dq, dk, dv dtypes must equal q dtype");
  NJ_FFI_CHECK(dout.element_count() == q.element_count() &&
                   lse.element_count() == q.element_count() / bp.f.head_dim &&
                   delta.element_count() == lse.element_count(),
               "dout must match q, and lse / delta must be [batch, *spatial, heads]");
  for (int a = 0; a < 3; ++a) {
    int group0 = (bp.f.extent[a] + bp.f.dilation[a] - 1) / bp.f.dilation[a];
    int tk = 1 << bp.f.kv_tile_log2[a];
    bp.num_kv_tiles[a] = (group0 + tk - 1) / tk;
  }
  // ---- impl (sm90 hook): which backward kernels; the sm90 ones refuse other devices clearly.
  NJ_FFI_CHECK(impl == 0 || impl == 1, "impl must be 0 (sm80 kernels) or 1 (sm90 kernels)");
  if (impl == 1) {
    const std::string why = fna::fna_backward_sm90_unavailable_reason(bp.f.head_dim, dtype);
    if (!why.empty())
      return ffi::Error::InvalidArgument("natten_jax fna backward (impl sm90): " + why);
  }
  bp.f.lse = const_cast<float*>(lse.typed_data());  // read only in the backward
  bp.dout = dout.untyped_data();
  bp.delta = delta.typed_data();
  bp.dq = dq->untyped_data();
  bp.dk = dk->untyped_data();
  bp.dv = dv->untyped_data();
  if (poison != 0) {
    NJ_CUDA_CHECK(cudaMemsetAsync(bp.dq, 0xFF, dq->size_bytes(), stream));
    NJ_CUDA_CHECK(cudaMemsetAsync(bp.dk, 0xFF, dk->size_bytes(), stream));
    NJ_CUDA_CHECK(cudaMemsetAsync(bp.dv, 0xFF, dv->size_bytes(), stream));
  }
  if (impl == 1) {
    NJ_CUDA_CHECK(fna::fna_backward_sm90(bp, dtype, stream));
    return ffi::Error::Success();
  }
  NJ_CUDA_CHECK(fna::fna_backward(bp, dtype, stream));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace natten_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxFnaForward, natten_jax::FnaForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // query
                                  .Arg<ffi::AnyBuffer>()         // key
                                  .Arg<ffi::AnyBuffer>()         // value
                                  .Ret<ffi::AnyBuffer>()         // output
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logsumexp
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("stride")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<ffi::Span<const int64_t>>("is_causal")
                                  .Attr<ffi::Span<const int64_t>>("q_tile")
                                  .Attr<ffi::Span<const int64_t>>("kv_tile")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("poison")
                                  .Attr<int64_t>("impl"),
                              NJ_FFI_HANDLER_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxFnaBackward, natten_jax::FnaBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // query
                                  .Arg<ffi::AnyBuffer>()         // key
                                  .Arg<ffi::AnyBuffer>()         // value
                                  .Arg<ffi::AnyBuffer>()         // d(output)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logsumexp (forward)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Ret<ffi::AnyBuffer>()         // d(query)
                                  .Ret<ffi::AnyBuffer>()         // d(key)
                                  .Ret<ffi::AnyBuffer>()         // d(value)
                                  .Attr<ffi::Span<const int64_t>>("kernel_size")
                                  .Attr<ffi::Span<const int64_t>>("stride")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<ffi::Span<const int64_t>>("is_causal")
                                  .Attr<ffi::Span<const int64_t>>("q_tile")
                                  .Attr<ffi::Span<const int64_t>>("kv_tile")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("poison")
                                  .Attr<int64_t>("impl"),
                              NJ_FFI_HANDLER_TRAITS);
