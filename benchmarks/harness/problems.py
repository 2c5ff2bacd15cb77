"""The benchmark problems: problems.json (+ its dilated / causal variants) and GQA variants,
and on request the showcase problems of problems-anchors.json (+ their block-dense gna variants).

Each file is the shared one under ``../shared/bench/`` (next to the repository) when it exists,
else the copy under ``benchmarks/`` (the copies travel with the repository to the GPU machine; a
test checks that they equal the shared files).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from natten_jax.window import prod

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_JSON = os.path.join(BENCH_DIR, "problems.json")
SHARED_JSON = os.path.normpath(os.path.join(BENCH_DIR, "..", "..", "shared", "bench",
                                            "problems.json"))
ANCHORS_NAME = "problems-anchors.json"
LOCAL_ANCHORS = os.path.join(BENCH_DIR, ANCHORS_NAME)
SHARED_ANCHORS = os.path.join(os.path.dirname(SHARED_JSON), ANCHORS_NAME)

# Key/value head counts of the GQA variants, per base problem (named e.g. "2d_gen_gqa4").
GQA = {"2d_gen": (4, 1), "3d_video": (4, 1)}

# Tiny problems for --quick (CPU-sized), same structure as problems.json.
QUICK = {
    "problems": {
        "q1d": {"batch": 2, "heads": 4, "spatial": [64], "kernel": [7], "head_dim": 32},
        "q2d": {"batch": 1, "heads": 4, "spatial": [10, 12], "kernel": [5, 3], "head_dim": 32},
        "q3d": {"batch": 1, "heads": 2, "spatial": [4, 6, 6], "kernel": [3, 3, 3], "head_dim": 32},
    },
    "variants": {
        "dilated": {"q2d": {"dilation": [2, 3], "stride": [2, 1]}},
        "causal": {"q1d": {"is_causal": [True]}, "q3d": {"is_causal": [True, False, False]}},
    },
}
QUICK_GQA = {"q2d": (1,)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One neighborhood-attention benchmark problem (layout [batch, *spatial, heads, head_dim])."""

    name: str
    batch: int
    heads: int
    heads_kv: int
    spatial: Tuple[int, ...]
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    causal: Tuple[bool, ...]
    head_dim: int

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return prod(self.spatial)

    def na_kwargs(self) -> dict:
        """Keyword arguments of ``natten_jax.na{rank}d`` (besides q, k, v)."""
        return dict(kernel_size=self.kernel, stride=self.stride, dilation=self.dilation,
                    is_causal=self.causal)

    def shapes(self) -> List[Tuple[int, ...]]:
        """Shapes of q, k, v and the output's cotangent."""
        return [(self.batch,) + self.spatial + (h, self.head_dim)
                for h in (self.heads, self.heads_kv, self.heads_kv, self.heads)]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        """The inverse of :meth:`to_json`."""
        spec = dict(d)
        spec["is_causal"] = spec.pop("causal")
        return make_problem(spec.pop("name"), spec)


def make_problem(name: str, spec: dict, heads_kv: Optional[int] = None) -> Problem:
    """A Problem from a problems.json entry (plus variant keys dilation / stride / is_causal)."""
    rank = len(spec["spatial"])
    return Problem(
        name=name,
        batch=int(spec["batch"]),
        heads=int(spec["heads"]),
        heads_kv=int(heads_kv if heads_kv is not None else spec.get("heads_kv", spec["heads"])),
        spatial=tuple(int(x) for x in spec["spatial"]),
        kernel=tuple(int(x) for x in spec["kernel"]),
        dilation=tuple(int(x) for x in spec.get("dilation", [1] * rank)),
        stride=tuple(int(x) for x in spec.get("stride", [1] * rank)),
        causal=tuple(bool(x) for x in spec.get("is_causal", [False] * rank)),
        head_dim=int(spec["head_dim"]),
    )


def json_path(anchors: bool = False) -> str:
    """problems.json (``anchors``: problems-anchors.json), the shared file where it exists."""
    shared, local = (SHARED_ANCHORS, LOCAL_ANCHORS) if anchors else (SHARED_JSON, LOCAL_JSON)
    return shared if os.path.exists(shared) else local


def expand(data: dict, gqa: Dict[str, Sequence[int]]) -> List[Problem]:
    """Base problems first, then their variants (``base_variant``), then GQA (``base_gqaN``):
    the order in which a time-limited run covers them."""
    bases = data["problems"]
    out = [make_problem(base, spec) for base, spec in bases.items()]
    for variant, per_base in data.get("variants", {}).items():
        for base, extra in per_base.items():
            out.append(make_problem(f"{base}_{variant}", {**bases[base], **extra}))
    for base, kv_heads in gqa.items():
        for hkv in kv_heads:
            out.append(make_problem(f"{base}_gqa{hkv}", bases[base], heads_kv=hkv))
    return out


def load(quick: bool = False, anchors: bool = False) -> List[Problem]:
    """All benchmark problems (``quick``: the tiny CPU-sized set; ``anchors``: then the
    showcase problems of problems-anchors.json too)."""
    if quick:
        return expand(QUICK, QUICK_GQA)
    with open(json_path()) as f:
        out = expand(json.load(f), GQA)
    if anchors:
        with open(json_path(anchors=True)) as f:
            out += expand(json.load(f), {})
    return out


def select(problems: List[Problem], names: Optional[str]) -> List[Problem]:
    """The problems named in a comma-separated list (all when ``names`` is empty)."""
    if not names:
        return problems
    by_name = {p.name: p for p in problems}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"--problems: unknown problem(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in wanted]
