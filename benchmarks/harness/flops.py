"""The work model: what a time is divided by.

* Neighborhood attention: useful work counts only the neighborhood's (query, key) pairs,
  4 * B * H * sum(#neighbors) * D for the forward; the backward counts as BWD_FACTOR times the
  forward (forward+backward = 3.5x). The floor of a time is the larger of work / peak matrix
  throughput and bytes of Q, K, V, O touched once (3x that for forward+backward) / peak
  bandwidth; "% floor" = floor / time. Visited work is what the fused kernel's tiles really do.
* NAT / DiNAT classifiers: multiply-accumulates per image (:func:`model_gmacs`).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

from natten_jax.window import num_neighbors

from benchmarks.harness.problems import Problem

BWD_FACTOR = 2.5
# H100 SXM figures of /work/shared/bench/peers-h100.md: dense cuDNN attention's practical
# matrix throughput and the measured copy bandwidth.
PEAK_TFLOPS = 630.0
PEAK_TBPS = 3.0


def constants() -> dict:
    """The figures above, as the JSON of a run records them."""
    return {"peak_tflops": PEAK_TFLOPS, "peak_tbps": PEAK_TBPS, "bwd_factor": BWD_FACTOR}


def useful_flops(p: Problem) -> int:
    """4 * B * H * (sum over queries of #neighbors) * head_dim: the forward's useful work."""
    pairs = num_neighbors(p.spatial, p.kernel, p.stride, p.dilation, p.causal)
    return 4 * p.batch * p.heads * pairs * p.head_dim


def min_bytes(p: Problem, itemsize: int) -> int:
    """Bytes of Q, K, V and O, each touched once (K and V with heads_kv heads)."""
    per_head = p.batch * p.tokens * p.head_dim * itemsize
    return per_head * (2 * p.heads + 2 * p.heads_kv)


def visited_flops(p: Problem, config=None, dtype=None) -> Optional[int]:
    """Forward work the fused kernel's tiles really do with ``config`` (a
    ``natten_jax.FusedConfig``; None: the default) on inputs of ``dtype`` (None: 16-bit;
    float32 runs other tiles), or None (logged) where it cannot say."""
    try:
        from natten_jax.backends import fused

        return int(fused.visited_flops(p.spatial, p.kernel, p.stride, p.dilation, p.causal,
                                       p.batch, p.heads, p.head_dim, config=config,
                                       dtype=dtype))
    except Exception as e:  # noqa: BLE001 - a number for the table, never a reason to stop
        print(f"visited_flops of {p.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def derive(row: dict, p: Problem, itemsize: int, visited: Optional[int] = None) -> None:
    """Adds useful (and visited) TFLOP/s, the floor and % of floor to the timing dicts
    ``row["fwd"]`` and ``row["fwd_bwd"]`` that hold an ``ms``."""
    flops = useful_flops(p)
    nbytes = min_bytes(p, itemsize)
    for mode, work, traffic in (("fwd", flops, nbytes),
                                ("fwd_bwd", flops * (1 + BWD_FACTOR), 3 * nbytes)):
        t = row.get(mode)
        if not t or "ms" not in t:
            continue
        s = t["ms"] / 1e3
        floor_s = max(work / (PEAK_TFLOPS * 1e12), traffic / (PEAK_TBPS * 1e12))
        t["useful_tflops"] = work / s / 1e12
        t["floor_ms"] = floor_s * 1e3
        t["pct_floor"] = 100.0 * floor_s / s
        if mode == "fwd" and visited:
            t["visited_tflops"] = visited / s / 1e12


def model_gmacs(cfg: dict, image_size: int = 224, num_classes: int = 1000,
                in_chans: int = 3) -> float:
    """Multiply-accumulates per image (G) of a NAT / DiNAT configuration
    (``natten_jax.models.CONFIGS``), the papers' "FLOPs" (fvcore counts one MAC as one FLOP):
    convolutions, linear layers, and q.k and a.v over the kernel_size^2 neighbors of every
    token; norms, softmax and activations left out. Exact at 224x224 (every feature map at least
    kernel_size * dilation); smaller inputs pad feature maps, not counted here."""
    C = int(cfg["embed_dim"])
    ks = cfg.get("kernel_size", 7)
    window = math.prod(ks) if isinstance(ks, (tuple, list)) else ks * ks
    h = math.ceil(image_size / 2)
    n = math.ceil(h / 2)
    macs = h * h * 9 * in_chans * (C // 2) + n * n * 9 * (C // 2) * C  # tokenizer
    depths = cfg["depths"]
    for i, depth in enumerate(depths):
        hidden = int(C * cfg["mlp_ratio"])
        per_token = 4 * C * C + 2 * C * hidden + 2 * window * C  # qkv+proj, mlp, q.k + a.v
        macs += depth * n * n * per_token
        if i < len(depths) - 1:
            n = math.ceil(n / 2)
            macs += n * n * 9 * C * 2 * C  # downsampler
            C *= 2
    return (macs + C * num_classes) / 1e9
