// Division by a divisor fixed for a whole launch (heads, dilation, stride, tile counts) as a
// multiply-high, an add and a shift, instead of the ~20-instruction sequence a runtime integer
// division compiles to. The fused kernels decode their block index and build their windows from
// a few dozen such divisions per CTA: ~600 of the ~3,500 SASS instructions of each head-dim-32
// sm80 kernel, which on small problems (NAT/DiNAT layers: ~12k CTAs of ~4 KV boxes each) run
// once per CTA against a short main loop (docs/perf-log.md, FastDiv).
//
// FastDiv(d) is built on the host (its constructor divides 64-bit integers) and carried in the
// kernel parameters; it converts to int (its divisor) where a plain value is wanted. quotient(n,
// d) is n / d for 0 <= n < 2^31 and d an int or a FastDiv, so code templated on the divisor
// type (window.cuh, neighborhood.cuh) serves both.
//
// Method (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994,
// fig. 4.1): with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 (< 2^32),
// n / d = (mulhi(n, m) + n) >> l for every 32-bit n; n < 2^31 keeps the sum within 32 bits.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NJ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NJ_HOST_DEVICE inline
#endif

namespace natten_jax {

struct FastDiv {
  int d;       // the divisor, >= 1
  uint32_t m;  // floor(2^32 (2^l - d) / d) + 1
  int l;       // ceil(log2 d)

  FastDiv() = default;
  NJ_HOST_DEVICE explicit FastDiv(int divisor) : d(divisor), m(0), l(0) {
    while ((int64_t{1} << l) < d) ++l;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
  }
  NJ_HOST_DEVICE operator int() const { return d; }

  // n / d for 0 <= n < 2^31.
  NJ_HOST_DEVICE int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(u) * m) >> 32);
    return static_cast<int>((t + u) >> l);
  }
};

// n / d for 0 <= n < 2^31 (d >= 1).
NJ_HOST_DEVICE int quotient(int n, int d) { return n / d; }
NJ_HOST_DEVICE int quotient(int n, const FastDiv& d) { return d.div(n); }

// n / d, and n - (n / d) * d into rem (0 <= n < 2^31; d an int or a FastDiv).
template <typename Div>
NJ_HOST_DEVICE int divmod(int n, const Div& d, int& rem) {
  const int q = quotient(n, d);
  rem = n - q * static_cast<int>(d);
  return q;
}

}  // namespace natten_jax
