"""Train a small NAT / DiNAT on synthetic images (Flax NNX + optax), as a smoke test.

Each class is an oriented sinusoidal grating (class ``c`` has angle ``c * pi / classes``) with
a random phase, frequency jitter, colour tint and Gaussian noise, so the label is learnable only
from the spatial pattern. The model is a tiny custom DiNAT-style configuration (three levels,
kernel 3, a dilated layer at level 0), trained with AdamW (no weight decay on biases, norms,
layer scales and relative positional biases), warmup + cosine schedule, label smoothing and
stochastic depth, under ``nnx.jit``.

    PYTHONPATH=. python examples/train_nat_synthetic.py            # CPU: about a minute
    PYTHONPATH=. python examples/train_nat_synthetic.py --bf16 --steps 500 --image-size 64

``rpb=False`` (default) runs :func:`natten_jax.na2d` with ``backend=None``: the fused CUDA
kernels when a GPU and the compiled extension are present, the reference backend otherwise.
``--rpb`` adds NAT's relative positional biases (unfused ops, ``natten_jax.unfused``).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from natten_jax.models import NAT, count_params, training


def make_images(rng: np.random.Generator, n: int, size: int, classes: int):
    """``n`` images ``[n, size, size, 3]`` float32 in roughly [-1.5, 1.5] and int labels."""
    labels = rng.integers(0, classes, n)
    angle = labels * (np.pi / classes) + rng.normal(0, 0.05, n)
    freq = (2 * np.pi / size) * rng.uniform(2.5, 4.0, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    proj = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
    wave = np.sin(freq[:, None, None] * proj + phase[:, None, None])
    tint = rng.uniform(0.5, 1.0, (n, 1, 1, 3))
    images = wave[..., None] * tint + rng.normal(0, 1.0, (n, size, size, 3))
    return images.astype(np.float32), labels.astype(np.int32)


def small_nat(num_classes: int, *, rpb: bool, dtype, rngs: nnx.Rngs) -> NAT:
    """A tiny DiNAT-style model for 32x32 - 64x64 inputs (feature maps /4, /8, /16)."""
    return NAT(embed_dim=32, mlp_ratio=2.0, depths=(2, 2, 2), num_heads=(2, 4, 8),
               kernel_size=3, dilations=((1, 2), (1, 1), (1, 1)), drop_path_rate=0.1,
               layer_scale=None, num_classes=num_classes, rpb=rpb, backend=None, dtype=dtype,
               rngs=rngs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute (fp32 params)")
    ap.add_argument("--rpb", action="store_true",
                    help="relative positional biases (needs natten_jax.unfused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    model = small_nat(args.classes, rpb=args.rpb, dtype=dtype, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps,
        end_value=args.lr * 0.01)
    optimizer = nnx.Optimizer(model, training.adamw(schedule, weight_decay=args.weight_decay),
                              wrt=nnx.Param)
    print(f"devices: {jax.devices()}; params: {count_params(model):,}; dtype: "
          f"{jnp.dtype(dtype).name}; rpb: {args.rpb}")

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        return training.train_step(model, optimizer, images.astype(dtype), labels,
                                   label_smoothing=args.label_smoothing)

    @nnx.jit
    def predict(model, images):
        return jnp.argmax(model(images.astype(dtype), deterministic=True), -1)

    rng = np.random.default_rng(args.seed)
    test_x, test_y = make_images(rng, 256, args.image_size, args.classes)
    model.train()
    t0 = time.perf_counter()
    first = last = None
    window = []
    for step in range(1, args.steps + 1):
        x, y = make_images(rng, args.batch_size, args.image_size, args.classes)
        loss, acc = train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
        window.append((float(loss), float(acc)))
        if step % args.log_every == 0 or step == args.steps:
            l, a = (float(np.mean(v)) for v in zip(*window))
            window = []
            first = l if first is None else first
            last = l
            print(f"step {step:5d}  loss {l:.4f}  train acc {a:.3f}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    model.eval()
    test_acc = float(np.mean(np.asarray(predict(model, jnp.asarray(test_x))) == test_y))
    chance = 1.0 / args.classes
    print(f"loss {first:.4f} -> {last:.4f}; held-out accuracy {test_acc:.3f} "
          f"(chance {chance:.3f}); {time.perf_counter() - t0:.1f}s")
    if not (last < first and math.isfinite(last)):
        raise SystemExit("loss did not fall")
    return test_acc


if __name__ == "__main__":
    main()
