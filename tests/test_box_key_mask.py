"""BoxKeyMask (src/cuda/include/natten_jax/neighborhood.cuh), the key masks of the sm90 kernels'
partly visible KV boxes, against brute force: compiled with the host C++ compiler (the header is
host-includable), for every box shape of 64 and 128 tokens (2^l[0] x 2^l[1] x 2^l[2],
row-major), both 64-bit words of a 128-token box, random window intervals and box origins, and
every combination of axes marked fully inside (not tested)."""

import subprocess

import host_cxx

_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include "natten_jax/neighborhood.cuh"
using natten_jax::BoxKeyMask;
static long checked = 0, wrong = 0;
static unsigned x = 12345u;
static int rnd(int n) { x = x * 1664525u + 1013904223u; return static_cast<int>((x >> 8) % n); }
template <int H>
static uint64_t word(const BoxKeyMask& bm, const int (&lo)[3], const int (&hi)[3],
                     const int (&o)[3], const bool (&full)[3]) {
  return bm.mask<H>(lo, hi, o, full);
}
int main() {
  for (int total = 6; total <= 7; ++total)
    for (int l0 = 0; l0 <= total; ++l0)
      for (int l1 = 0; l0 + l1 <= total; ++l1) {
        const int l[3] = {l0, l1, total - l0 - l1};
        const BoxKeyMask bm(l);
        for (int trial = 0; trial < 400; ++trial) {
          int lo[3], hi[3], o[3];
          bool full[3];
          for (int a = 0; a < 3; ++a) {
            const int ext = 1 << l[a];
            o[a] = rnd(50);
            lo[a] = o[a] + rnd(ext + 6) - 3;  // before, inside or after the box
            hi[a] = lo[a] + rnd(ext + 4);     // possibly empty
            full[a] = rnd(4) == 0;
          }
          uint64_t want[2] = {0, 0};
          for (int t = 0; t < (1 << total); ++t) {
            const int c[3] = {t >> (l[1] + l[2]), (t >> l[2]) & ((1 << l[1]) - 1),
                              t & ((1 << l[2]) - 1)};
            bool in = true;
            for (int a = 0; a < 3; ++a)
              if (!full[a]) in = in && o[a] + c[a] >= lo[a] && o[a] + c[a] < hi[a];
            if (in) want[t >> 6] |= 1ull << (t & 63);
          }
          const uint64_t got[2] = {word<0>(bm, lo, hi, o, full), word<1>(bm, lo, hi, o, full)};
          for (int h = 0; h < (total == 7 ? 2 : 1); ++h) {
            ++checked;
            if (got[h] != want[h] && ++wrong <= 10)
              std::printf("wrong: l %d %d %d word %d: %016llx want %016llx\n", l[0], l[1], l[2],
                          h, static_cast<unsigned long long>(got[h]),
                          static_cast<unsigned long long>(want[h]));
          }
        }
      }
  std::printf("checked %ld wrong %ld\n", checked, wrong);
  return wrong != 0;
}
"""


def test_box_key_mask_matches_brute_force(tmp_path):
    exe = host_cxx.compile_program(tmp_path, _PROGRAM, "box_key_mask")
    r = subprocess.run([exe], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrong 0" in r.stdout
