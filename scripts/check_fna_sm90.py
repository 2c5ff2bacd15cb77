"""GPU self-check of the sm90 (wgmma) fused forward kernel against the sm80 one.

    python scripts/check_fna_sm90.py [--quick] [--problems 2d_gen,3d_video,1d_long,2d_nat_t]

1. Correctness: small problems (ranks 1-3, dilation, stride, causal, GQA, head dims 64/128,
   bf16/fp16, 64- and 128-query tiles) through both kernels, outputs poisoned with NaN; every
   element of O and LSE within the fused tests' rule against the float64 reference
   (tests/test_fused.py: twice the error of the reference in the inputs' precision plus
   FlashAttention's rounding allowance); prints the relative L2 error of O and the max |LSE
   error| too.
2. Speed: the benchmark problems (benchmarks/problems.json) through both kernels with each
   kernel's cost-model tiles; prints ms, visited TFLOP/s and the relative difference of the two
   outputs.

Exit status 1 if any correctness check fails (so one GPU call says whether it works).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from natten_jax import _ffi, autotune, tiles  # noqa: E402
from natten_jax.backends import fused  # noqa: E402
from natten_jax.checks import check_na_call  # noqa: E402
from test_fused import check_forward, reference_forward  # noqa: E402 (sets POISON_OUTPUTS)

fused.POISON_OUTPUTS = True

# (spatial, kernel, stride, dilation, causal, heads, heads_kv, head_dim, dtype)
SMALL = [
    ((100,), 7, 1, 1, False, 4, 4, 64, "bfloat16"),
    ((300,), 33, 4, 3, True, 4, 2, 128, "float16"),
    ((3000,), 511, 1, 1, False, 2, 1, 128, "bfloat16"),
    ((2500,), 300, 1, 1, True, 2, 2, 64, "float16"),
    ((17, 23), (5, 7), (2, 3), (2, 1), (True, False), 4, 1, 64, "bfloat16"),
    ((40, 33), 11, 1, 3, False, 4, 2, 128, "bfloat16"),
    ((72, 80), (31, 23), 1, 1, False, 2, 1, 128, "float16"),
    ((9, 70), (9, 31), 1, (1, 2), (False, True), 2, 2, 64, "bfloat16"),
    ((6, 10, 12), (3, 5, 4), (1, 2, 2), (2, 1, 3), (True, False, False), 4, 2, 128, "bfloat16"),
    ((10, 24, 24), (5, 9, 9), 1, 1, (True, False, False), 2, 1, 64, "float16"),
    ((8, 16, 16), 7, 1, 1, False, 4, 4, 128, "float16"),
]


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, shape_q, shape_kv, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], shape_q, jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], shape_kv, jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], shape_kv, jnp.float32).astype(dtype)
    return q, k, v


def _time(fn, args, budget_s=1.5):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-5)
    n = int(min(200, max(3, budget_s / 3 / one)))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def correctness(quick: bool) -> bool:
    print("== correctness vs float64 reference, per element (and rel L2 of O, max |dLSE|)")
    print(f"{'case':<58} {'impl':<5} {'q':>4} {'rel O':>9} {'dLSE':>9}  ok")
    ok_all = True
    cases = SMALL[::3] if quick else SMALL
    for i, (S, ksz, st, dil, ca, H, Hkv, D, dt) in enumerate(cases):
        rank = len(S)
        q, k, v = _inputs(i, (1, *S, H, D), (1, *S, Hkv, D), dt)
        p = check_na_call(rank, q, k, v, ksz, st, dil, ca, None)
        refs = reference_forward(q, k, v, ksz, st, dil, ca)
        ref, ref_lse = refs[0]
        for impl in ("sm80", "sm90"):
            for qn in (6, 7):
                tl = tiles._choose_tiles(tuple(S), p.kernel_size, p.stride, p.dilation,
                                         p.is_causal, D, (qn,), impl)
                name = f"{S} k{ksz} s{st} d{dil} c{ca} H{H}/{Hkv} D{D} {dt}"
                r, dl, ok = float("nan"), float("nan"), False
                try:
                    out, lse = fused._forward_call(p, q, k, v, tiles=tl, impl=impl)
                    out = np.asarray(out.astype(jnp.float32))
                    lse = np.asarray(lse)
                    r = _rel(out, ref)
                    dl = float(np.max(np.abs(lse - ref_lse)))
                    check_forward(out, lse, refs)
                    ok = True
                except AssertionError as e:
                    print(f"   {str(e)[:400]}")
                except Exception as e:  # noqa: BLE001
                    print(f"   {type(e).__name__}: {str(e)[:300]}")
                ok_all &= ok
                print(f"{name[:58]:<58} {impl:<5} {1 << qn:>4} {r:9.2e} {dl:9.2e}  "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok_all


def speed(names, quick: bool, both_q: bool = False):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "benchmarks", "problems.json")) as f:
        probs = json.load(f)["problems"]
    print("\n== speed (bf16 forward, cost-model tiles per kernel)")
    print(f"{'problem':<10} {'impl':<5} {'q tile':<10} {'kv tile':<10} {'ms':>8} "
          f"{'visited TF/s':>12} {'rel vs sm80':>11}")
    rows = []
    for name in names:
        pr = probs[name]
        S, K, D = tuple(pr["spatial"]), tuple(pr["kernel"]), pr["head_dim"]
        B, H = pr["batch"], pr["heads"]
        if quick:
            B = 1
        rank = len(S)
        q, k, v = _inputs(0, (B, *S, H, D), (B, *S, H, D), "bfloat16")
        p = check_na_call(rank, q, k, v, K, 1, 1, False, None)
        ones = (1,) * rank
        ref_out = None
        runs = [("sm80", None), ("sm90", None)]
        if both_q:  # the sm90 kernel with each Q tile size (cost-model shapes of that size)
            runs += [("sm90", 6), ("sm90", 7)]
        for impl, qn in runs:
            if not tiles.impl_supports(impl, D):
                print(f"{name:<10} {impl:<5} (no sm90 kernel at head dim {D})")
                continue
            if qn is None:
                tl = tiles.choose_tiles(S, K, ones, ones, (False,) * rank, D, impl=impl)
            else:
                tl = tiles._choose_tiles(S, K, ones, ones, (False,) * rank, D, (qn,), impl)
            fn = jax.jit(lambda q, k, v, tl=tl, impl=impl: fused._forward_call(
                p, q, k, v, tiles=tl, impl=impl))
            try:
                ms = _time(fn, (q, k, v))
                out = np.asarray(fn(q, k, v)[0].astype(jnp.float32))
            except Exception as e:  # noqa: BLE001
                print(f"{name:<10} {impl:<5} FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            flops = 4 * B * H * D * tiles.visited_pairs(S, K, ones, ones, (False,) * rank, *tl)
            rel = "" if ref_out is None else f"{_rel(out, ref_out):11.2e}"
            if impl == "sm80":
                ref_out = out
            print(f"{name:<10} {impl:<5} {str(tl[0]):<10} {str(tl[1]):<10} {ms:8.3f} "
                  f"{flops / ms / 1e9:12.1f} {rel:>11}", flush=True)
            rows.append((name, impl, ms))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer cases, batch 1")
    ap.add_argument("--problems", default="2d_gen,3d_video,1d_long,2d_nat_t")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--both-q", action="store_true",
                    help="also time the sm90 kernel with 64- and 128-query tiles")
    a = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} (compute capability "
          f"{getattr(dev, 'compute_capability', '?')}); module archs "
          f"{_ffi.cuda_compiled_archs()}; kernels available: {_ffi.cuda_kernels_available()} "
          f"{_ffi.unavailable_reason()}")
    if not autotune.hopper_device():
        print("not a compute capability 9.0 GPU: the sm90 kernel does not run here")
        return 2
    ok = True if a.no_correctness else correctness(a.quick)
    if not a.no_speed:
        speed([n for n in a.problems.split(",") if n], a.quick, a.both_q)
    print("\nsm90 correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
