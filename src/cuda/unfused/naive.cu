// The naive unfused kernels (the baseline of the GEMM ones): one thread per output element, a
// grid-stride loop over out [batch, tokens, heads, inner] (row-major), each element computed in
// fp32 by an operator and stored in the output dtype.
//
//   PN  one logit out[b, x, h, j]: a dot product over the head dim with the key of window entry
//       j, plus the relative positional bias;
//   NN  out[b, x, h, c]: the weighted sum of value feature c over the query's window;
//   IN  out[b, y, hk, c]: the sum over the queries whose window holds key y (and over the G query
//       heads of key/value head hk) of w[b, x, h, j(x, y)] * bm[b, x, h, c].
//
// An operator is a struct with
//   template <typename T>
//   static __device__ float value(const UnfusedParams&, const NaiveElement&);
#include <cstdint>

#include "natten_jax/unfused/launch_utils.cuh"
#include "natten_jax/unfused/unfused_common.cuh"

namespace natten_jax {
namespace unfused {
namespace {

// Where one output element lies: out[b, token, head, inner] of `tokens` tokens.
struct NaiveElement {
  int b, token, head, inner;
  int tokens;
};

template <typename Op, typename T>
__global__ void __launch_bounds__(kNaiveThreads)
    naive_kernel(const __grid_constant__ UnfusedParams p, int heads, int inner) {
  const int tokens = num_tokens(p);
  const int64_t total = int64_t(p.batch) * tokens * heads * inner;
  T* out = static_cast<T*>(p.out);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    NaiveElement e;
    e.tokens = tokens;
    int64_t rest = idx;
    e.inner = static_cast<int>(rest % inner);
    rest /= inner;
    e.head = static_cast<int>(rest % heads);
    rest /= heads;
    e.token = static_cast<int>(rest % tokens);
    e.b = static_cast<int>(rest / tokens);
    out[idx] = from_float<T>(Op::template value<T>(p, e));
  }
}

// Launches the naive kernel of operator Op for `dtype`; the output is [batch, tokens, heads,
// inner].
template <typename Op>
cudaError_t launch_naive(const UnfusedParams& p, int heads, int inner, DType dtype,
                         cudaStream_t stream) {
  const int64_t total = int64_t(p.batch) * num_tokens(p) * heads * inner;
  return dispatch_dtype(dtype, [&](auto t) {
    naive_kernel<Op, decltype(t)>
        <<<naive_blocks(total), kNaiveThreads, 0, stream>>>(p, heads, inner);
    return cudaGetLastError();
  });
}

// PN: out [batch, tokens, heads, kernel volume].
struct NaivePn {
  template <typename T>
  static __device__ float value(const UnfusedParams& p, const NaiveElement& e) {
    const TokenWindow w = token_window(p, e.token);
    int ja[3], ki[3];
    window_entry(p, e.inner, ja);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      if (!offset_in_window(ja[a], w.len[a])) return p.fill;  // causal: no neighbor
      ki[a] = w.start[a] + ja[a];
    }
    const int y = token_index(p, w.n, ki);
    const T* qrow = static_cast<const T*>(p.a) +
                    ((int64_t(e.b) * e.tokens + e.token) * p.heads + e.head) * p.dim;
    const T* krow = static_cast<const T*>(p.bm) +
                    ((int64_t(e.b) * e.tokens + y) * p.heads_kv +
                     e.head / (p.heads / p.heads_kv)) * p.dim;
    float acc = 0.f;
    for (int c = 0; c < p.dim; ++c) acc += to_float(qrow[c]) * to_float(krow[c]);
    float v = acc * p.scale;
    if (p.rpb != nullptr) v += p.rpb[int64_t(e.head) * rpb_size(p) + rpb_index(p, w.i, ki)];
    return v;
  }
};

// NN: out [batch, tokens, heads, dim].
struct NaiveNn {
  template <typename T>
  static __device__ float value(const UnfusedParams& p, const NaiveElement& e) {
    const TokenWindow tw = token_window(p, e.token);
    const T* wrow = static_cast<const T*>(p.a) +
                    ((int64_t(e.b) * e.tokens + e.token) * p.heads + e.head) * p.window;
    const int64_t vstride = int64_t(p.heads_kv) * p.dim;  // between tokens
    const T* vb = static_cast<const T*>(p.bm) + int64_t(e.b) * e.tokens * vstride +
                  (e.head / (p.heads / p.heads_kv)) * p.dim + e.inner;
    float acc = 0.f;
    int ki[3];
    for (int j0 = 0; j0 < tw.len[0]; ++j0) {
      ki[0] = tw.start[0] + j0;
      for (int j1 = 0; j1 < tw.len[1]; ++j1) {
        ki[1] = tw.start[1] + j1;
        const int jrow = (j0 * p.kernel[1] + j1) * p.kernel[2];
        for (int j2 = 0; j2 < tw.len[2]; ++j2) {
          ki[2] = tw.start[2] + j2;
          acc += to_float(wrow[jrow + j2]) * to_float(vb[token_index(p, tw.n, ki) * vstride]);
        }
      }
    }
    return acc * p.scale;
  }
};

// IN: out [batch, tokens, heads_kv, dim].
struct NaiveIn {
  template <typename T>
  static __device__ float value(const UnfusedParams& p, const NaiveElement& e) {
    const int G = p.heads / p.heads_kv;
    const TokenWindow kw = token_window(p, e.token);  // the key's group and in-group coordinates
    // The queries that see the key, per axis; each of them sees it, so the window offsets
    // j = key - start(query) below are all valid entries.
    Interval inv[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) inv[a] = kw.n.inverse(a, kw.i[a], kw.i[a]);
    const T* w = static_cast<const T*>(p.a);
    const T* xm = static_cast<const T*>(p.bm);
    const int64_t base = int64_t(e.b) * e.tokens;
    float acc = 0.f;
    int qi[3];
    for (qi[0] = inv[0].lo; qi[0] < inv[0].hi; ++qi[0]) {
      const int j0 = kw.i[0] - kw.n.start(0, qi[0]);
      for (qi[1] = inv[1].lo; qi[1] < inv[1].hi; ++qi[1]) {
        const int j1 = kw.i[1] - kw.n.start(1, qi[1]);
        for (qi[2] = inv[2].lo; qi[2] < inv[2].hi; ++qi[2]) {
          const int j = (j0 * p.kernel[1] + j1) * p.kernel[2] + kw.i[2] - kw.n.start(2, qi[2]);
          const int64_t row = (base + token_index(p, kw.n, qi)) * p.heads + e.head * G;
          for (int g = 0; g < G; ++g)
            acc += to_float(w[(row + g) * p.window + j]) *
                   to_float(xm[(row + g) * p.dim + e.inner]);
        }
      }
    }
    return acc * p.scale;
  }
};

}  // namespace

cudaError_t naive_pn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return launch_naive<NaivePn>(p, p.heads, p.window, dtype, stream);
}
cudaError_t naive_nn(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return launch_naive<NaiveNn>(p, p.heads, p.dim, dtype, stream);
}
cudaError_t naive_in(const UnfusedParams& p, DType dtype, cudaStream_t stream) {
  return launch_naive<NaiveIn>(p, p.heads_kv, p.dim, dtype, stream);
}

}  // namespace unfused
}  // namespace natten_jax
