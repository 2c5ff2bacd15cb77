"""Share of a NAT / DiNAT step spent in its neighborhood attention, measured by subtraction.

  python -m benchmarks.attention_share [--variants nat_mini,nat_tiny,dinat_tiny]
      [--dtypes bf16] [--modes train,infer] [--backends fused] [--batch 128] [--reps 5]
      [--out share.json] [--quick]

Each (variant, dtype, mode) is timed twice with the same model, batches and timing as
benchmarks.model_throughput: as it is, and with ``natten_jax.na2d`` replaced by ``out = v``
(same shape and dtype; gradients still flow through the value projection, so the projections,
MLPs, norms and the optimizer are unchanged). The attention's share of the step is
``1 - t_without / t_with``, and ``1 / (1 - share)`` is the most any attention kernel could speed
the step up: what bounds issue 22's training target (1.4x images/s) before any kernel work.

The backend is the first of ``--backends`` in model_throughput's run order (fused, gemm, naive,
reference; default fused); ``dense`` is never used. Flags are those of
benchmarks.model_throughput (its ``--out`` here names this script's JSON).
"""

from __future__ import annotations

import contextlib
import json
import sys

from benchmarks import model_throughput as mt


@contextlib.contextmanager
def attention_removed():
    """``natten_jax.na2d`` returns its value argument (the models look it up at call time)."""
    import natten_jax

    original = natten_jax.na2d
    natten_jax.na2d = lambda query, key, value, *args, **kwargs: value
    try:
        yield
    finally:
        natten_jax.na2d = original


def main(argv=None) -> list:
    args = mt.parse_args(argv)
    backend = next((b for b in mt.RUN_ORDER if b in args.backend_names and b != "dense"), None)
    if backend is None:
        raise SystemExit("--backends: name a neighborhood-attention backend (not only dense)")
    rows = []
    for variant in args.variant_names:
        for dtype in args.dtype_names:
            batches = mt.make_batches(args.batch, args.image_size, dtype)
            for mode in args.mode_names:
                with_ms = mt.measure(variant, backend, dtype, mode, batches, args)["ms"]
                with attention_removed():
                    without_ms = mt.measure(variant, backend, dtype, mode, batches, args)["ms"]
                share = 1.0 - without_ms / with_ms
                row = {"variant": variant, "backend": backend, "dtype": dtype, "mode": mode,
                       "batch": args.batch, "ms_with_attention": with_ms,
                       "ms_without_attention": without_ms, "attention_share": share,
                       "max_speedup_from_attention": with_ms / without_ms}
                rows.append(row)
                print(f"{variant:<12} {mt.DTYPE_SHORT[dtype]:<5} {mode:<6} with {with_ms:9.3f} ms"
                      f"  without {without_ms:9.3f} ms  share {share:6.1%}  at most "
                      f"{with_ms / without_ms:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "rows": rows}, f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
