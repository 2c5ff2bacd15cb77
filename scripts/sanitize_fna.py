"""One small fused problem per rank, forward and backward kernels, for compute-sanitizer
(memcheck / racecheck).

    compute-sanitizer --tool memcheck python3 scripts/sanitize_fna.py

The sm90 (wgmma) kernels on a Hopper GPU: NATTEN_JAX_FNA_IMPL=sm90 (forward) and / or
NATTEN_JAX_FNA_BWD_IMPL=sm90 (backward) in the environment; they cover the head dim 64 and 128
cases (head dim 32 stays on sm80). Each line names the backward kernels the case ran.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import natten_jax  # noqa: E402
from natten_jax import autotune, tiles  # noqa: E402

CASES = [
    (natten_jax.na1d, (70,), 9, 2, 3, True, 64),
    (natten_jax.na2d, (13, 19), (5, 4), (2, 1), (1, 3), (False, True), 32),
    (natten_jax.na3d, (5, 6, 9), (3, 3, 4), (1, 2, 1), (1, 2, 2), (True, False, False), 128),
]
for i, (f, sp, k, s, d, c, D) in enumerate(CASES):
    key = jax.random.split(jax.random.PRNGKey(i), 3)
    q = jax.random.normal(key[0], (2, *sp, 4, D)).astype(jnp.bfloat16)
    kk = jax.random.normal(key[1], (2, *sp, 2, D)).astype(jnp.bfloat16)
    v = jax.random.normal(key[2], (2, *sp, 2, D)).astype(jnp.bfloat16)
    out = f(q, kk, v, k, s, d, c, backend="fused").block_until_ready()
    grads = jax.grad(lambda q, kk, v: jnp.sum(f(q, kk, v, k, s, d, c, backend="fused").astype(
        jnp.float32) ** 2), argnums=(0, 1, 2))(q, kk, v)
    finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in (out, *grads))
    print(f"rank {len(sp)} ok", out.shape, "finite:", finite, f"(head dim {D}: forward setting "
          f"{tiles.impl_setting()}, backward {autotune.bwd_impl(D)})")
