"""Peers to compare against, on the same problems and heads-last inputs [B, *S, H, D]:

* ``cudnn``: dense self-attention over all tokens (``jax.nn.dot_product_attention``,
  implementation="cudnn"), the O(T^2) cost neighborhood attention exists to beat. Causal only for
  1-D causal problems (token-causal equals NA-causal's ordering there).
* ``xla``: XLA dense attention with the exact NA mask (from :mod:`natten_jax.window`), run only
  when the fp32 logits (T * T * H * B * 4 bytes) stay under ``XLA_DENSE_MAX_BYTES``.
* ``flex``: torch FlexAttention (compiled) with NATTEN's mask as a ``mask_mod`` on row-major token
  indices. It runs in a subprocess (``python -m benchmarks.peers flex '<problem json>'``) so that a
  torch failure, a library clash with JAX, or torch's memory pool cannot take the benchmark down.

The JAX peers are functions ``(q, k, v) -> out`` for :func:`benchmarks.harness.timing.time_jax`;
the flex peer returns its timing dicts. Failures are reported as ``{"error": "..."}``, never raised.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from typing import Callable

import numpy as np

from benchmarks.harness.problems import Problem
from benchmarks.harness.run import error_text
from natten_jax.window import is_neighbor_1d

XLA_DENSE_MAX_BYTES = 8e9
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "PEER_RESULT "


class PeerSkipped(Exception):
    """A peer that does not apply to a problem (the message says why)."""


def _flat(x):
    """[B, *S, H, D] -> [B, T, H, D] (row-major tokens; free in XLA)."""
    return x.reshape((x.shape[0], -1) + x.shape[-2:])


# ---------------------------------------------------------------------------------------- cuDNN
def cudnn_fn(p: Problem) -> Callable:
    import jax

    causal = p.rank == 1 and p.causal[0]

    def f(q, k, v):
        out = jax.nn.dot_product_attention(_flat(q), _flat(k), _flat(v), is_causal=causal,
                                           implementation="cudnn")
        return out.reshape(q.shape)

    return f


# --------------------------------------------------------------------------- XLA masked dense
def axis_masks(p: Problem):
    """Per spatial axis a, [L, L] bool: key (column) is in query (row)'s window on that axis."""
    out = []
    for L, k, s, d, c in zip(p.spatial, p.kernel, p.stride, p.dilation, p.causal):
        x = np.arange(L)
        out.append(np.asarray(is_neighbor_1d(x[:, None], x[None, :], k, s, d, L, c)))
    return out


def combine_axis_masks(masks, xp=np):
    """[T, T] bool from per-axis masks: a pair is neighbors iff it is on every axis (row-major
    tokens). ``xp``: numpy or jax.numpy."""
    rank = len(masks)
    mask = None
    for a, m in enumerate(masks):
        shape = [1] * (2 * rank)
        shape[a] = shape[rank + a] = m.shape[0]
        m = xp.reshape(m, shape)
        mask = m if mask is None else mask & m
    T = int(np.prod([m.shape[0] for m in masks]))
    return xp.reshape(mask, (T, T))


def dense_mask(p: Problem) -> np.ndarray:
    """[T, T] bool, True where key (column) is a neighbor of query (row); row-major tokens."""
    return combine_axis_masks(axis_masks(p))


def xla_dense_bytes(p: Problem) -> int:
    return p.tokens * p.tokens * p.heads * p.batch * 4


def xla_fn(p: Problem) -> Callable:
    """XLA dense attention restricted to NA's neighbors (raises PeerSkipped when too big)."""
    import jax
    import jax.numpy as jnp

    if xla_dense_bytes(p) >= XLA_DENSE_MAX_BYTES:
        raise PeerSkipped(f"too big: fp32 logits would take {xla_dense_bytes(p) / 1e9:.1f} GB "
                          f"(limit {XLA_DENSE_MAX_BYTES / 1e9:.0f} GB)")
    masks = axis_masks(p)  # small constants; the [T, T] mask is built inside the program

    def f(q, k, v):
        mask = combine_axis_masks([jnp.asarray(m) for m in masks], jnp)[None, None]
        out = jax.nn.dot_product_attention(_flat(q), _flat(k), _flat(v), mask=mask,
                                           implementation="xla")
        return out.reshape(q.shape)

    return f


def jax_peer_fn(name: str, p: Problem) -> Callable:
    if name == "cudnn":
        return cudnn_fn(p)
    if name == "xla":
        return xla_fn(p)
    raise ValueError(f"unknown JAX peer {name!r}")


# ------------------------------------------------------------------------------ flex mask_mod
def na_mask_mod(p: Problem, minimum: Callable, maximum: Callable) -> Callable:
    """NATTEN's neighbor test as ``mask_mod(b, h, q_idx, kv_idx)`` on row-major token indices.

    Written with integer operators only plus ``minimum`` / ``maximum`` (torch.minimum-like on
    arrays, ``maximum(x, 0)`` with an int), so one definition serves torch (FlexAttention) and
    NumPy (tests). Mirrors :func:`natten_jax.window.window_bounds` per axis.
    """
    axes = list(zip(p.spatial, p.kernel, p.stride, p.dilation, p.causal))

    def coords(idx):
        out = []
        for L in reversed(p.spatial):
            out.append(idx % L)
            idx = idx // L
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for (L, k, s, d, causal), x, y in zip(axes, coords(q_idx), coords(kv_idx)):
            g = x % d
            i = x // d
            glen = (L - g + d - 1) // d
            if causal:
                leader = minimum((i // s) * s + (s - 1), glen - 1)
                start = maximum(leader - (k - 1), 0)
                end = i + 1
            else:
                leader = minimum((i // s) * s + s // 2, glen - 1)
                start = minimum(maximum(leader - k // 2, 0), glen - k)
                end = start + k
            j = y // d
            cond = ((y % d) == g) & (j >= start) & (j < end)
            ok = cond if ok is None else ok & cond
        return ok

    return mask_mod


def torch_na_mask_mod(p: Problem) -> Callable:
    import torch

    def minimum(a, b):
        return torch.clamp(a, max=b) if isinstance(b, int) else torch.minimum(a, b)

    def maximum(a, b):
        return torch.clamp(a, min=b) if isinstance(b, int) else torch.maximum(a, b)

    return na_mask_mod(p, minimum, maximum)


# ----------------------------------------------------------------------------- flex (in-process)
def _block_mask(mask_mod, T: int):
    from torch.nn.attention.flex_attention import create_block_mask
    import torch

    errors = []
    for how in ("compiled", "_compile", "eager"):
        try:
            if how == "compiled":
                return torch.compile(create_block_mask)(mask_mod, B=None, H=None, Q_LEN=T,
                                                        KV_LEN=T, device="cuda")
            if how == "_compile":
                return create_block_mask(mask_mod, None, None, T, T, device="cuda",
                                         _compile=True)
            return create_block_mask(mask_mod, None, None, T, T, device="cuda")
        except Exception as e:  # noqa: BLE001 - try the next way
            errors.append(f"{how}: {type(e).__name__}: {e}"[:200])
    raise RuntimeError("create_block_mask failed: " + " | ".join(errors))


def flex_run(p: Problem, dtype: str, reps: int, budget_s: float, fwd_only: bool) -> dict:
    """Times compiled FlexAttention with the NA block mask in this process (needs torch+CUDA)."""
    import time

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.harness.timing import time_torch

    if not torch.cuda.is_available():
        raise PeerSkipped("torch has no CUDA device")
    tdt = getattr(torch, dtype)
    T = p.tokens
    t0 = time.perf_counter()
    bm = _block_mask(torch_na_mask_mod(p), T)
    torch.cuda.synchronize()
    info = {"block_mask_s": time.perf_counter() - t0, "torch": torch.__version__}
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = p.heads != p.heads_kv

    def attn(q, k, v):
        return flex(q, k, v, block_mask=bm, enable_gqa=gqa)

    def make_sets(n):
        g = torch.Generator(device="cuda").manual_seed(0)
        shapes = [(p.batch, p.heads, T, p.head_dim), (p.batch, p.heads_kv, T, p.head_dim),
                  (p.batch, p.heads_kv, T, p.head_dim), (p.batch, p.heads, T, p.head_dim)]
        return [tuple(torch.randn(s, generator=g, device="cuda", dtype=tdt) for s in shapes)
                for _ in range(n)]

    n_sets = 3 if 4 * T * p.batch * p.heads * p.head_dim * 2 < 2e9 else 2
    sets = make_sets(n_sets)
    out = dict(info)
    try:
        out["fwd"] = time_torch(lambda q, k, v, ct: attn(q, k, v), sets, reps, budget_s)
    except Exception as e:  # noqa: BLE001
        out["fwd"] = {"error": error_text(e)}
    if not fwd_only:
        gsets = [tuple(x.requires_grad_(i < 3) for i, x in enumerate(s)) for s in sets]

        def fwd_bwd(q, k, v, ct):
            return torch.autograd.grad(attn(q, k, v), (q, k, v), ct)

        try:
            out["fwd_bwd"] = time_torch(fwd_bwd, gsets, reps, budget_s)
        except Exception as e:  # noqa: BLE001
            out["fwd_bwd"] = {"error": error_text(e)}
    return out


# ---------------------------------------------------------------------------- flex (subprocess)
def flex_subprocess(p: Problem, dtype: str, reps: int, budget_s: float, fwd_only: bool,
                    timeout_s: float = 300.0) -> dict:
    """Runs :func:`flex_run` in a child process; returns its dict or ``{"error": ...}``."""
    if importlib.util.find_spec("torch") is None:
        return {"error": "torch is not importable"}
    cmd = [sys.executable, "-m", "benchmarks.peers", "flex", json.dumps(p.to_json()),
           "--dtype", dtype, "--reps", str(reps), "--budget-s", str(budget_s)]
    if fwd_only:
        cmd.append("--fwd-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return {"error": f"flex subprocess exited {r.returncode}: {' / '.join(tail)}"[:500]}


def _main(argv=None):
    ap = argparse.ArgumentParser(description="Child process of the flex peer.")
    ap.add_argument("peer", choices=["flex"])
    ap.add_argument("problem", help="Problem as JSON (Problem.to_json())")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=20.0)
    ap.add_argument("--fwd-only", action="store_true")
    a = ap.parse_args(argv)
    p = Problem.from_json(json.loads(a.problem))
    try:
        out = flex_run(p, a.dtype, a.reps, a.budget_s, a.fwd_only)
    except Exception as e:  # noqa: BLE001
        out = {"error": error_text(e)}
    print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
    _main()
