// XLA FFI handlers of the unfused neighborhood-attention operators (src/cuda/unfused/):
//
//   natten_jax_unfused_pn        (a [B,*S,H,C], bm [B,*S,Hkv,C], rpb f32) -> [B,*S,H,W]
//   natten_jax_unfused_nn        (w [B,*S,H,W], v [B,*S,Hkv,C])           -> [B,*S,H,C]
//   natten_jax_unfused_in        (w [B,*S,H,W], x [B,*S,H,C])             -> [B,*S,Hkv,C]
//   natten_jax_unfused_rpb_grad  (w [B,*S,H,W])  -> f32 partial sums [ceil(T / 64), H, R]
//
// (see natten_jax/unfused/unfused_params.h for what each computes). Attributes, int64 arrays
// with one entry per spatial axis: kernel_size, dilation, is_causal; int64: impl (0 naive,
// 1 gemm; gemm runs the naive kernel where its tiles do not fit), poison (nonzero: fill the
// output with NaN first, for tests); PN also has_rpb (int64), scale and fill (f32); NN / IN
// scale (f32). Inputs and outputs share one dtype: float32, float16 or bfloat16.
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "natten_jax/common/ffi_attrs.h"
#include "natten_jax/common/ffi_check.h"
#include "natten_jax/unfused/unfused_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natten_jax {
namespace {

using unfused::DType;
using unfused::UnfusedParams;

ffi::Error dtype_of(ffi::DataType t, DType* d) {
  switch (t) {
    case ffi::DataType::F32: *d = DType::kFloat32; return ffi::Error::Success();
    case ffi::DataType::F16: *d = DType::kFloat16; return ffi::Error::Success();
    case ffi::DataType::BF16: *d = DType::kBFloat16; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "natten_jax unfused: dtype must be float32, float16 or bfloat16");
  }
}

// Spatial shape, window attributes, batch and heads of `ref` ([B, *S, H, X]) into `p`, padded
// to rank 3 with leading axes of extent 1.
ffi::Error fill_geometry(const char* op, const ffi::AnyBuffer& ref, AxisAttr kernel_size,
                         AxisAttr dilation, AxisAttr is_causal, UnfusedParams& p) {
  const auto d = ref.dimensions();
  const int nd = static_cast<int>(d.size());
  const int rank = nd - 3;
  NJ_FFI_CHECK(rank >= 1 && rank <= 3,
               std::string(op) + ": operands must be [batch, *spatial (1-3 axes), heads, "
                                 "features]");
  p = UnfusedParams{};
  NJ_FFI_CHECK(d[0] >= 1 && d[0] <= INT32_MAX, std::string(op) + ": bad batch size");
  p.batch = static_cast<int>(d[0]);
  NJ_RETURN_IF_ERROR(spatial_extents(op, d, 1, rank, p.extent));
  int stride[3];  // the unfused operators have stride 1
  NJ_RETURN_IF_ERROR(window_attrs(op, rank, p.extent, kernel_size, nullptr, dilation, is_causal,
                                  p.kernel, stride, p.dilation, p.causal));
  const int64_t tokens = int64_t(p.extent[0]) * p.extent[1] * p.extent[2];
  p.window = p.kernel[0] * p.kernel[1] * p.kernel[2];
  NJ_FFI_CHECK(d[nd - 2] >= 1 && d[nd - 1] >= 1, std::string(op) + ": empty heads or features");
  NJ_FFI_CHECK(tokens * d[nd - 2] * (d[nd - 1] > p.window ? d[nd - 1] : p.window) < INT32_MAX,
               std::string(op) + ": tokens x heads x features must stay below 2^31 per batch "
                                 "entry");
  p.heads = static_cast<int>(d[nd - 2]);
  p.scale = 1.f;
  return ffi::Error::Success();
}

// Whether `x` is [B, *S, heads, features] with the batch and spatial shape of p.
bool has_shape(const ffi::AnyBuffer& x, const UnfusedParams& p, int nd, int64_t heads,
               int64_t features) {
  const auto d = x.dimensions();
  if (static_cast<int>(d.size()) != nd || d[0] != p.batch || d[nd - 2] != heads ||
      d[nd - 1] != features)
    return false;
  const int rank = nd - 3;
  for (int a = 0; a < rank; ++a)
    if (d[1 + a] != p.extent[3 - rank + a]) return false;
  return true;
}

bool has_shape(ffi::Result<ffi::AnyBuffer>& x, const UnfusedParams& p, int nd, int64_t heads,
               int64_t features) {
  return has_shape(*x, p, nd, heads, features);
}

ffi::Error poison_output(int64_t poison, void* data, size_t bytes, cudaStream_t stream) {
  if (poison != 0) NJ_CUDA_CHECK(cudaMemsetAsync(data, 0xFF, bytes, stream));
  return ffi::Error::Success();
}

using Launcher = cudaError_t (*)(const UnfusedParams&, DType, cudaStream_t);

// The GEMM kernel when asked for and it fits, else the naive one.
ffi::Error run(int64_t impl, Launcher gemm, Launcher naive, const UnfusedParams& p, DType dtype,
               cudaStream_t stream) {
  NJ_FFI_CHECK(impl == 0 || impl == 1, "unfused: impl must be 0 (naive) or 1 (gemm)");
  if (impl == 1) {
    const cudaError_t err = gemm(p, dtype, stream);
    if (err != cudaErrorNotSupported) {
      NJ_CUDA_CHECK(err);
      return ffi::Error::Success();
    }
  }
  NJ_CUDA_CHECK(naive(p, dtype, stream));
  return ffi::Error::Success();
}

ffi::Error PnImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer bm,
                  ffi::Buffer<ffi::F32> rpb, ffi::Result<ffi::AnyBuffer> out,
                  AxisAttr kernel_size, AxisAttr dilation, AxisAttr is_causal, int64_t impl,
                  int64_t has_rpb, float scale, float fill, int64_t poison) {
  UnfusedParams p;
  NJ_RETURN_IF_ERROR(fill_geometry("unfused pn", a, kernel_size, dilation, is_causal, p));
  DType dtype;
  NJ_RETURN_IF_ERROR(dtype_of(a.element_type(), &dtype));
  NJ_FFI_CHECK(bm.element_type() == a.element_type() && out->element_type() == a.element_type(),
               "unfused pn: operands and output must share a dtype");
  const int nd = static_cast<int>(a.dimensions().size());
  p.dim = static_cast<int>(a.dimensions()[nd - 1]);
  p.heads_kv = static_cast<int>(bm.dimensions().size() == a.dimensions().size()
                                    ? bm.dimensions()[nd - 2]
                                    : 0);
  NJ_FFI_CHECK(p.heads_kv >= 1 && p.heads % p.heads_kv == 0,
               "unfused pn: key heads must divide query heads");
  NJ_FFI_CHECK(has_shape(bm, p, nd, p.heads_kv, p.dim),
               "unfused pn: key must be [batch, *spatial, heads_kv, head_dim] like the query");
  NJ_FFI_CHECK(has_shape(out, p, nd, p.heads, p.window),
               "unfused pn: output must be [batch, *spatial, heads, prod(kernel_size)]");
  if (has_rpb != 0) {
    for (int ax = 0; ax < 3; ++ax)
      NJ_FFI_CHECK(p.causal[ax] == 0 && p.kernel[ax] % 2 == 1,
                   "unfused pn: RPB needs odd kernel sizes and no causal axis");
    const int64_t r = int64_t(2 * p.kernel[0] - 1) * (2 * p.kernel[1] - 1) * (2 * p.kernel[2] - 1);
    NJ_FFI_CHECK(static_cast<int64_t>(rpb.element_count()) == p.heads * r,
                 "unfused pn: rpb must hold heads * prod(2 * kernel_size - 1) values");
    p.rpb = rpb.typed_data();
  }
  p.a = a.untyped_data();
  p.bm = bm.untyped_data();
  p.out = out->untyped_data();
  p.scale = scale;
  p.fill = fill;
  NJ_RETURN_IF_ERROR(poison_output(poison, p.out, out->size_bytes(), stream));
  return run(impl, unfused::gemm_pn, unfused::naive_pn, p, dtype, stream);
}

// The NN (inverse = false) and IN (inverse = true) handlers: weights w, dense operand m (NN:
// values; IN: query-side features) -> output.
template <bool inverse>
ffi::Error WeightedSumImpl(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer m,
                           ffi::Result<ffi::AnyBuffer> out, AxisAttr kernel_size,
                           AxisAttr dilation, AxisAttr is_causal, int64_t impl, float scale,
                           int64_t poison) {
  const char* op = inverse ? "unfused in" : "unfused nn";
  UnfusedParams p;
  NJ_RETURN_IF_ERROR(fill_geometry(op, w, kernel_size, dilation, is_causal, p));
  DType dtype;
  NJ_RETURN_IF_ERROR(dtype_of(w.element_type(), &dtype));
  NJ_FFI_CHECK(m.element_type() == w.element_type() && out->element_type() == w.element_type(),
               std::string(op) + ": operands and output must share a dtype");
  const int nd = static_cast<int>(w.dimensions().size());
  NJ_FFI_CHECK(w.dimensions()[nd - 1] == p.window,
               std::string(op) + ": weights must be [batch, *spatial, heads, prod(kernel_size)]");
  NJ_FFI_CHECK(static_cast<int>(m.dimensions().size()) == nd &&
                   static_cast<int>(out->dimensions().size()) == nd,
               std::string(op) + ": operand ranks differ");
  p.dim = static_cast<int>(m.dimensions()[nd - 1]);
  p.heads_kv = static_cast<int>(inverse ? out->dimensions()[nd - 2] : m.dimensions()[nd - 2]);
  NJ_FFI_CHECK(p.heads_kv >= 1 && p.heads % p.heads_kv == 0,
               std::string(op) + ": key/value heads must divide the weights' heads");
  NJ_FFI_CHECK(has_shape(m, p, nd, inverse ? p.heads : p.heads_kv, p.dim),
               std::string(op) + ": dense operand has the wrong shape");
  NJ_FFI_CHECK(has_shape(out, p, nd, inverse ? p.heads_kv : p.heads, p.dim),
               std::string(op) + ": output has the wrong shape");
  p.a = w.untyped_data();
  p.bm = m.untyped_data();
  p.out = out->untyped_data();
  p.scale = scale;
  NJ_RETURN_IF_ERROR(poison_output(poison, p.out, out->size_bytes(), stream));
  if (inverse) return run(impl, unfused::gemm_in, unfused::naive_in, p, dtype, stream);
  return run(impl, unfused::gemm_nn, unfused::naive_nn, p, dtype, stream);
}

// Their binding.
auto weighted_sum_binding() {
  return bind_window_attrs<false>(
             bind_stream().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>())
      .Attr<int64_t>("impl")
      .Attr<float>("scale")
      .Attr<int64_t>("poison");
}

ffi::Error RpbGradImpl(cudaStream_t stream, ffi::AnyBuffer w,
                       ffi::Result<ffi::Buffer<ffi::F32>> partial, AxisAttr kernel_size,
                       AxisAttr dilation, AxisAttr is_causal, int64_t poison) {
  UnfusedParams p;
  NJ_RETURN_IF_ERROR(fill_geometry("unfused rpb_grad", w, kernel_size, dilation, is_causal, p));
  DType dtype;
  NJ_RETURN_IF_ERROR(dtype_of(w.element_type(), &dtype));
  const int nd = static_cast<int>(w.dimensions().size());
  NJ_FFI_CHECK(w.dimensions()[nd - 1] == p.window,
               "unfused rpb_grad: weights must be [batch, *spatial, heads, prod(kernel_size)]");
  const int64_t tokens = int64_t(p.extent[0]) * p.extent[1] * p.extent[2];
  const int64_t chunks = (tokens + unfused::kRpbChunkTokens - 1) / unfused::kRpbChunkTokens;
  const int64_t r = int64_t(2 * p.kernel[0] - 1) * (2 * p.kernel[1] - 1) * (2 * p.kernel[2] - 1);
  const auto pd = partial->dimensions();
  NJ_FFI_CHECK(pd.size() == 3 && pd[0] == chunks && pd[1] == p.heads && pd[2] == r,
               "unfused rpb_grad: result must be [ceil(tokens / 64), heads, "
               "prod(2 * kernel_size - 1)] float32");
  NJ_FFI_CHECK(chunks <= INT32_MAX, "unfused rpb_grad: too many tokens");
  p.heads_kv = p.heads;
  p.dim = 1;
  p.a = w.untyped_data();
  p.out = partial->typed_data();
  p.rpb_chunks = static_cast<int>(chunks);
  NJ_RETURN_IF_ERROR(poison_output(poison, p.out, partial->size_bytes(), stream));
  NJ_CUDA_CHECK(unfused::rpb_grad_partials(p, dtype, stream));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace natten_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NattenJaxUnfusedPn, natten_jax::PnImpl,
    natten_jax::bind_window_attrs<false>(natten_jax::bind_stream()
                                             .Arg<ffi::AnyBuffer>()         // a: query side
                                             .Arg<ffi::AnyBuffer>()         // bm: key side
                                             .Arg<ffi::Buffer<ffi::F32>>()  // rpb (if has_rpb)
                                             .Ret<ffi::AnyBuffer>())        // logits
        .Attr<int64_t>("impl")
        .Attr<int64_t>("has_rpb")
        .Attr<float>("scale")
        .Attr<float>("fill")
        .Attr<int64_t>("poison"),
    NJ_FFI_HANDLER_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxUnfusedNn, natten_jax::WeightedSumImpl<false>,
                              natten_jax::weighted_sum_binding(), NJ_FFI_HANDLER_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenJaxUnfusedIn, natten_jax::WeightedSumImpl<true>,
                              natten_jax::weighted_sum_binding(), NJ_FFI_HANDLER_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    NattenJaxUnfusedRpbGrad, natten_jax::RpbGradImpl,
    natten_jax::bind_window_attrs<false>(natten_jax::bind_stream()
                                             .Arg<ffi::AnyBuffer>()          // d(logits)
                                             .Ret<ffi::Buffer<ffi::F32>>())  // partial sums
        .Attr<int64_t>("poison"),
    NJ_FFI_HANDLER_TRAITS);
