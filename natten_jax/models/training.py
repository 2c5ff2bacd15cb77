"""One training step for the NAT / DiNAT classifiers (Flax NNX + optax), shared by
``examples/train_nat_synthetic.py`` and ``benchmarks/model_throughput.py``.

* :func:`adamw`: AdamW with global-norm clipping and no weight decay on biases, norms, layer
  scales and relative positional biases (:func:`weight_decay_mask`);
* :func:`loss_fn`: label-smoothed softmax cross-entropy, logits in float32;
* :func:`train_step`: ``nnx.value_and_grad`` of the loss, then ``optimizer.update``.

None of them is jitted here: wrap :func:`train_step` in ``nnx.jit`` (the example) or split
model and optimizer and ``jax.jit`` a pure function of their state (the benchmark)::

    optimizer = nnx.Optimizer(model, training.adamw(1e-3), wrt=nnx.Param)
    step = nnx.jit(training.train_step)
    loss, accuracy = step(model, optimizer, images, labels)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def weight_decay_mask(params):
    """Decay matrices and conv kernels only (not biases, norms, layer scales, rpb)."""
    def keep(path, x):
        name = jax.tree_util.keystr(path)
        return x.ndim > 1 and "rpb" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def adamw(learning_rate, *, weight_decay: float = 0.05,
          clip_norm: float = 5.0) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then AdamW with :func:`weight_decay_mask`;
    ``learning_rate`` is a float or an optax schedule."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask))


def loss_fn(model, images, labels, *, label_smoothing: float = 0.1):
    """(mean label-smoothed cross-entropy, float32 logits) of ``model(images)``."""
    logits = model(images).astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean(), logits


def train_step(model, optimizer: nnx.Optimizer, images, labels, *,
               label_smoothing: float = 0.1):
    """One optimisation step in place on ``model`` and ``optimizer``; returns
    (loss, accuracy) of the batch (before the update). ``images`` are fed as given: cast them
    to the model's computation dtype first."""
    def loss_of(model):
        return loss_fn(model, images, labels, label_smoothing=label_smoothing)

    (loss, logits), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)
