"""The sm90 forward per (Q tile, KV box) size class, on the GPU: what calibrates the cost model.

For each problem (benchmarks/problems.json and problems-anchors.json, bf16) and each size class
the sm90 forward takes (64-query tiles with 64-key boxes, 128 with 64, 128 with 128), the shape
of that class with the fewest visited pairs is timed through the forward custom call (one jitted
call per iteration, median of --reps batches), with the useful and visited TFLOP/s (the ratios
of the classes' visited rates are what natten_jax.tiles._SM90_PAIR_COST holds) and the class
the cost model picks.

    python3 scripts/sm90_box_sizes.py --problems 2d_flux_gna 2d_gen [--out sizes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from headline_times import timed  # noqa: E402

from benchmarks.harness import flops, problems  # noqa: E402
from natten_jax import FusedConfig, tiles  # noqa: E402
from natten_jax.backends import fused  # noqa: E402
from natten_jax.checks import check_na_call  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="+", required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for prob in problems.select(problems.load(anchors=True), ",".join(args.problems)):
        name, rank = prob.name, prob.rank
        q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16)
                   for kk, shape in zip(jax.random.split(jax.random.PRNGKey(0), 3),
                                        prob.shapes()))
        p = check_na_call(rank, q, k, v, prob.kernel, prob.stride, prob.dilation, prob.causal,
                          None, backend_config=FusedConfig(forward_impl="sm90"))
        geo = (tuple(p.spatial), tuple(p.kernel_size), tuple(p.stride), tuple(p.dilation),
               tuple(p.is_causal))
        useful = flops.useful_flops(prob)
        picked = tiles.choose_tiles(*geo, p.head_dim, impl="sm90")
        for (qn, kn), tl in tiles.sm90_class_tiles(*geo).items():
            fn = jax.jit(lambda q, k, v, tl=tl: fused._forward_call(p, q, k, v, tiles=tl,
                                                                   impl="sm90")[0])
            first = timed(fn, (q, k, v), 1, 1)
            ms = timed(fn, (q, k, v), max(1, int(args.budget_ms / max(first, 1e-3))), args.reps)
            visited = 4 * prob.batch * prob.heads * prob.head_dim * tiles.visited_pairs(*geo, *tl)
            row = dict(problem=name, q_log2=qn, kv_log2=kn, tiles=[list(tl[0]), list(tl[1])],
                       ms=ms, useful_tflops=useful / ms / 1e9, visited_tflops=visited / ms / 1e9,
                       picked=[list(x) for x in picked] == [list(tl[0]), list(tl[1])])
            rows.append(row)
            print(f"{name:<16} Q{1 << qn:<4} KV{1 << kn:<4} {str(tl):<24} {ms:9.4f} ms "
                  f"useful {row['useful_tflops']:6.1f} visited {row['visited_tflops']:6.1f} "
                  f"TFLOP/s{'  <- cost model' if row['picked'] else ''}", flush=True)
    if args.out:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, open(args.out, "w"),
                  indent=1)


if __name__ == "__main__":
    main()
