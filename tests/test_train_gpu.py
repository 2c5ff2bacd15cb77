"""A small NAT trains through the fused kernels on the GPU: jax.grad runs our backward kernels,
its gradients match the reference backend's, and the loss falls."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from natten_jax import FusedConfig
from natten_jax.backends import fused
from natten_jax.models import NAT

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from train_nat_synthetic import make_images  # noqa: E402

pytestmark = pytest.mark.gpu
CLASSES = 4
KERNELS = FusedConfig(backward="kernel")  # the fused backward kernels, whatever the environment


def _model(backend, seed=0):
    # head_dim 32 on every level (64 / 2, 128 / 4, 256 / 8): the fused kernels run every layer.
    return NAT(embed_dim=64, mlp_ratio=2.0, depths=(1, 2, 1), num_heads=(2, 4, 8), kernel_size=3,
               dilations=((1,), (1, 2), (1,)), drop_path_rate=0.0, layer_scale=None,
               num_classes=CLASSES, rpb=False, backend=backend, backend_config=KERNELS,
               dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))


def _loss(model, x, y):
    logits = model(x.astype(jnp.bfloat16), deterministic=True).astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, CLASSES)).mean()


def test_nat_grads_match_reference_and_run_the_backward_kernel():
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(a) for a in make_images(rng, 8, 64, CLASSES))
    grads = {}
    for backend in ("fused", "reference"):
        model = _model(backend)
        g = nnx.jit(nnx.grad(_loss))
        if backend == "fused":
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            hlo = jax.jit(jax.grad(lambda s, x, y: _loss(nnx.merge(graphdef, s, rest), x, y)))
            hlo = hlo.lower(params, x, y).as_text()
            assert fused.TARGET_BACKWARD in hlo and fused.TARGET in hlo
        grads[backend] = jax.tree_util.tree_leaves(nnx.state(g(model, x, y), nnx.Param))
    num = sum(float(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2))
              for a, b in zip(grads["fused"], grads["reference"]))
    den = sum(float(jnp.sum(b.astype(jnp.float32) ** 2)) for b in grads["reference"])
    assert np.isfinite(num) and (num / den) ** 0.5 < 5e-2, (num / den) ** 0.5


def test_nat_trains_with_fused_kernels():
    model = _model("fused", seed=1)
    optimizer = nnx.Optimizer(model, optax.adamw(2e-3, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(1)
    losses = []
    for _ in range(60):
        x, y = make_images(rng, 32, 64, CLASSES)
        losses.append(float(step(model, optimizer, jnp.asarray(x), jnp.asarray(y))))
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
