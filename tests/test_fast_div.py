"""FastDiv (src/cuda/include/natten_jax/fast_div.h), the multiply-shift division the fused
kernels decode their block index and build their windows with, against the integer division
it replaces: compiled with the host C++ compiler (the header is host-includable), over every
numerator below 2^17 for divisors 1..2^12, the top of the numerator range, and divisors near
powers of two up to INT_MAX."""

import subprocess

import host_cxx

_PROGRAM = r"""
#include <climits>
#include <cstdio>
#include <vector>
#include "natten_jax/fast_div.h"
using natten_jax::FastDiv;
static long checked = 0, wrong = 0;
static void check(int n, int d) {
  const FastDiv f(d);
  int r = -1;
  const int q = natten_jax::divmod(n, f, r);
  ++checked;
  if (q != n / d || r != n % d || natten_jax::quotient(n, f) != n / d ||
      static_cast<int>(f) != d) {
    if (++wrong <= 10) std::printf("wrong: %d / %d -> %d rem %d\n", n, d, q, r);
  }
}
int main() {
  std::vector<int> big_d, big_n;
  for (int k = 0; k <= 31; ++k)
    for (long long e = -2; e <= 2; ++e) {
      const long long v = (1LL << k) + e;
      if (v >= 1 && v <= INT_MAX) {
        big_d.push_back(static_cast<int>(v));
        big_n.push_back(static_cast<int>(v));
      }
    }
  for (int n = INT_MAX - 4096; n < INT_MAX; ++n) big_n.push_back(n);
  big_n.push_back(INT_MAX);
  for (int d = 1; d <= 4096; ++d) big_d.push_back(d);
  for (int d = 1; d <= 4096; ++d)
    for (int n = 0; n < (1 << 17); ++n) check(n, d);
  for (int d : big_d)
    for (int n : big_n) check(n, d);
  unsigned x = 12345u;  // random pairs
  for (int i = 0; i < 2000000; ++i) {
    x = x * 1664525u + 1013904223u; const int n = static_cast<int>(x >> 1);
    x = x * 1664525u + 1013904223u; const int d = static_cast<int>((x >> 1) >> (x & 31u)) | 1;
    check(n, d);
  }
  std::printf("checked %ld wrong %ld\n", checked, wrong);
  return wrong != 0;
}
"""


def test_fast_div_equals_integer_division(tmp_path):
    exe = host_cxx.compile_program(tmp_path, _PROGRAM, "fast_div", opt="-O2")
    res = subprocess.run([exe], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:]
    checked = int(res.stdout.split()[-3])
    assert checked > 4096 * (1 << 17), res.stdout
