"""One small fused problem per rank, forward and backward kernels, for compute-sanitizer
(memcheck / racecheck).

    compute-sanitizer --tool memcheck python3 scripts/sanitize_fna.py [--forward-impl sm90]
        [--backward-impl sm90]

``--forward-impl`` / ``--backward-impl`` (``auto``, ``sm80``, ``sm90``) name the kernels, as
:class:`natten_jax.FusedConfig` fields; left out, the default configuration's (the documented
environment variables ``NATTEN_JAX_FNA_IMPL`` / ``NATTEN_JAX_FNA_BWD_IMPL``, else ``auto``: the
sm90 kernels on a Hopper GPU). The sm90 (wgmma) kernels cover the head dim 64 and 128 cases
(head dim 32 stays on sm80); each case also runs as a ragged batch (valid_extent) and in
float32 (TF32, both precisions: sm80 kernels). Where the sm90 forward runs, each bf16 case
also runs it once per kernel variant (64-query tiles with 64-key boxes, 128-query tiles with
64- and with 128-key boxes); ``--forward-variants`` runs only these (a quick racecheck of the
forward). Outputs are poisoned with NaN before the kernels run. Each line names the kernels the
case ran (the custom calls' ``impl`` attributes). Exit status 1 if an output or a gradient has
a non-finite element.
"""
import argparse
import itertools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import natten_jax  # noqa: E402
from natten_jax import tiles  # noqa: E402
from natten_jax.backends import fused  # noqa: E402
from natten_jax.checks import check_na_call  # noqa: E402
from natten_jax.config import default_config  # noqa: E402

CASES = [
    (natten_jax.na1d, (70,), 9, 2, 3, True, 64),
    (natten_jax.na2d, (13, 19), (5, 4), (2, 1), (1, 3), (False, True), 32),
    (natten_jax.na3d, (5, 6, 9), (3, 3, 4), (1, 2, 1), (1, 2, 2), (True, False, False), 128),
]
# Each case runs bf16 at full extent, bf16 as a ragged batch (sample 0 full, sample 1 at these
# extents: tiles wholly and partly outside it), and float32 at both precisions.
RAGGED = [[40], [9, 14], [3, 6, 9]]  # each at least kernel * dilation
VARIANTS = [("bfloat16", None, None), ("bfloat16", "ragged", None),
            ("float32", None, "default"), ("float32", "ragged", "highest")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forward-impl", choices=("auto",) + tiles.IMPLS)
    ap.add_argument("--backward-impl", choices=("auto",) + tiles.IMPLS)
    ap.add_argument("--forward-variants", action="store_true",
                    help="only the sm90 forward's kernel variants, bf16")
    a = ap.parse_args()
    chosen = {"forward_impl": a.forward_impl, "backward_impl": a.backward_impl}
    config = default_config().replace(backward="kernel",
                                      **{k: v for k, v in chosen.items() if v is not None})
    fused.POISON_OUTPUTS = True  # an element a kernel does not write stays NaN
    ok = True
    for (i, (f, sp, k, s, d, c, D)), (dtype, ragged, precision) in itertools.product(
            enumerate(CASES), VARIANTS[:1] if a.forward_variants else VARIANTS):
        key = jax.random.split(jax.random.PRNGKey(i), 3)
        q = jax.random.normal(key[0], (2, *sp, 4, D)).astype(dtype)
        kk = jax.random.normal(key[1], (2, *sp, 2, D)).astype(dtype)
        v = jax.random.normal(key[2], (2, *sp, 2, D)).astype(dtype)
        ve = jnp.asarray([list(sp), RAGGED[i]], jnp.int32) if ragged else None
        na = lambda q, kk, v: f(q, kk, v, k, s, d, c, backend="fused",  # noqa: E731
                                backend_config=config, valid_extent=ve, precision=precision)
        p = check_na_call(len(sp), q, kk, v, k, s, d, c, None, backend_config=config)
        if dtype == "bfloat16" and not ragged:
            ok &= forward_variants(p, q, kk, v)
        if a.forward_variants:
            continue
        out = na(q, kk, v).block_until_ready()
        grads = jax.grad(lambda q, kk, v: jnp.sum(na(q, kk, v).astype(jnp.float32) ** 2),
                         argnums=(0, 1, 2))(q, kk, v)
        finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in (out, *grads))
        ok &= finite
        impls = [tiles.IMPLS[int(np.asarray(fused._attrs(p, backward=b)["impl"]))]
                 for b in (False, True)]
        print(f"rank {len(sp)} head dim {D} {dtype}{' ragged' if ragged else ''}"
              f"{' ' + precision if precision else ''}: forward {impls[0]}, backward "
              f"{impls[1]}; all elements finite: {finite}", flush=True)
    # Undilated, not ragged: where the 128-key boxes load through TMA (sm90_tma.cuh).
    key = jax.random.split(jax.random.PRNGKey(99), 3)
    q = jax.random.normal(key[0], (2, 20, 24, 4, 128)).astype("bfloat16")
    kk = jax.random.normal(key[1], (2, 20, 24, 2, 128)).astype("bfloat16")
    v = jax.random.normal(key[2], (2, 20, 24, 2, 128)).astype("bfloat16")
    ok &= forward_variants(check_na_call(2, q, kk, v, (7, 9), 1, 1, (False, True), None,
                                         backend_config=config), q, kk, v)
    return 0 if ok else 1


def forward_variants(p, q, k, v) -> bool:
    """The sm90 forward once per kernel variant (if it runs this case): whether every output
    element is finite."""
    if tiles.IMPLS[int(np.asarray(fused._attrs(p)["impl"]))] != "sm90":
        return True
    ok = True
    for tl in tiles.sm90_class_tiles(p.spatial, p.kernel_size, p.stride, p.dilation,
                                     p.is_causal).values():
        out, lse = fused._forward_call(p, q, k, v, tiles=tl, impl="sm90")
        finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
        ok &= finite
        print(f"rank {p.rank} head dim {p.head_dim} sm90 forward, tiles {tl}: all elements "
              f"finite: {finite}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
