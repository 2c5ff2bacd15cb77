"""What a run writes: its environment and device name, JSON and text files (each written whole
through a rename, so that a run killed from outside leaves the last complete one), and the
records that the docs' current tables are generated from.

Records: ``benchmarks/results/<gpu>.json`` (``<gpu>``: :func:`device_slug`, e.g. ``h200``;
read by benchmarks/results_docs.py, which makes the docs' tables of them)::

    {"device": "NVIDIA H200", "commit": "28c65fa", "date": "2026-12-02",
     "command": "python -m benchmarks.bench_na ...",
     "rows": [{"problem": "2d_gen", "impl": "natten_jax", "mode": "fwd", "ms": 0.93,
               "dtype": "bfloat16", "backend": "fused", "commit": "28c65fa",
               "spread_pct": ..., "useful_tflops": ..., ...}, ...]}

``impl``: ``natten_jax`` (our fused backend with the run's configuration), ``natten_jax/<name>``
(our other rows: ``natten_jax/reference``, ``natten_jax/fused_sm80``, ...), or the peer's name
(``cudnn``, ``natten``, ``xla``, ``flex``); ``mode``: ``fwd`` or ``fwdbwd``; ``ms``: the
headline time. One row per (problem, impl, mode), of one dtype per file, plus float32 rows
(``--dtype float32``) with ``"precision"`` (``default`` / ``highest``), one per (problem, impl,
mode, precision), beside them: :func:`merge` replaces
the rows a new run measured again and keeps the others (each row names the commit it was
measured at; the top-level commit and date are the last run's, and its command is added to the
file's). Other top-level fields (``about``, ``problems``, ...) are kept. Only measured rows are
recorded (failures stay in the run's own JSON).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Iterable, List, Optional

from benchmarks.harness.problems import BENCH_DIR

RESULTS_DIR = os.path.join(BENCH_DIR, "results")
REPO = os.path.dirname(BENCH_DIR)
MODES = {"fwd": "fwd", "fwd_bwd": "fwdbwd"}  # a run's timing keys -> the records' modes
OURS = "natten_jax"
PEERS = ("cudnn", "natten", "xla", "flex")
# A row's identity; "precision" only in float32 rows (bench_na --dtype float32), None elsewhere.
KEY = ("problem", "impl", "mode", "precision")
# A record's extra fields, copied from the run's timing dict when present.
TIMING_FIELDS = ("ms_call", "spread_pct", "reps", "useful_tflops", "visited_tflops")


# ------------------------------------------------------------------------------ environment
def env_info() -> dict:
    """Date, versions and the device (``device``: JAX's device kind of the first device)."""
    import jax

    info = {"date": now(), "jax": jax.__version__, "python": sys.version.split()[0]}
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    d = jax.devices()[0]
    info["device"] = getattr(d, "device_kind", str(d))
    info["platform"] = d.platform
    info["torch"] = None
    if importlib.util.find_spec("torch") is not None:
        try:
            from importlib.metadata import version

            info["torch"] = version("torch")
        except Exception:  # noqa: BLE001
            info["torch"] = "unknown"
    return info


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def device_slug(kind: str) -> str:
    """A file name for a device kind: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" ->
    "h100", "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx4090",
    "cpu" -> "cpu": the words up to the first with a digit, vendor words left out, lower case,
    letters and digits only."""
    words = [w for w in re.split(r"[\s_]+", kind.lower()) if w and w not in _VENDOR_WORDS]
    out = []
    for w in words:
        w = w.split("-")[0]
        out.append(re.sub(r"[^a-z0-9]", "", w))
        if re.search(r"\d", w):
            break
    slug = "".join(out)
    if not slug:
        raise ValueError(f"device kind {kind!r} gives no file name")
    return slug


def git_commit(repo: str = REPO) -> str:
    """The checkout's short commit, or "unknown" (e.g. a copy without .git)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


# ------------------------------------------------------------------------------------ files
def write_text(path: Optional[str], text: str) -> None:
    """``text`` to ``path`` (folders made) through a temporary file and a rename; no-op
    without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: Optional[str], obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


# ---------------------------------------------------------------------------------- records
def record_impl(name: str) -> str:
    """The records' impl of a run's implementation name ("fused", "reference", "fused_sm80",
    "peer:cudnn" or "cudnn", ...)."""
    peer = name.split(":", 1)[1] if name.startswith("peer:") else name
    if peer in PEERS:
        return peer
    return OURS if name == "fused" else f"{OURS}/{name}"


def records(rows: Iterable[dict], dtype: Optional[str] = None,
            commit: str = "unknown") -> List[dict]:
    """The records of a run's rows (``{"problem", "impl", "fwd": timing, "fwd_bwd": timing,
    ...}``; ``dtype`` for rows that do not name theirs): one per measured mode."""
    out = []
    for r in rows:
        for mode, rec_mode in MODES.items():
            t = r.get(mode) or {}
            if not isinstance(t.get("ms"), (int, float)):
                continue
            rec = {"problem": r["problem"], "impl": record_impl(r["impl"]), "mode": rec_mode,
                   "ms": t["ms"], "dtype": r.get("dtype", dtype), "backend": r["impl"],
                   "commit": commit}
            rec.update({k: t[k] for k in TIMING_FIELDS if t.get(k) is not None})
            if r.get("fused_config"):
                rec["fused_config"] = r["fused_config"]
            if r.get("precision"):  # float32 rows: "default" or "highest"
                rec["precision"] = r["precision"]
            out.append(rec)
    return out


def results_path(path: str, device: str) -> str:
    """``path`` itself, or ``path/<device_slug>.json`` when ``path`` is a folder (or ends
    with a slash)."""
    if path.endswith(os.sep) or os.path.isdir(path):
        return os.path.join(path, device_slug(device) + ".json")
    return path


def merge(path: str, device: str, commit: str, command: str, new_rows: List[dict]) -> dict:
    """Merges ``new_rows`` (:func:`records`) into the records file ``path`` (created if
    missing) and returns what it wrote: a row of the same (problem, impl, mode) is replaced
    where it was, the others appended. A file of another device, or with rows of another
    dtype, is refused (exit naming --results)."""
    data = {"device": device, "commit": commit, "date": "", "command": "", "rows": []}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
        if data.get("device") != device:
            raise SystemExit(f"--results {path}: holds {data.get('device')!r} rows, this run "
                             f"is on {device!r}")
        # One 16-bit dtype per file; float32 rows (keyed by their precision) sit beside it.
        theirs = {r["dtype"] for r in data["rows"] if r.get("dtype") not in (None, "float32")}
        mine = {r["dtype"] for r in new_rows if r.get("dtype") not in (None, "float32")}
        if len(theirs | mine) > 1:
            raise SystemExit(f"--results {path}: holds {sorted(theirs)} rows, this run "
                             f"{sorted(mine)}: one dtype per file (float32 rows, by "
                             f"precision, aside)")
    index = {tuple(r.get(k) for k in KEY): i for i, r in enumerate(data["rows"])}
    for r in new_rows:
        key = tuple(r.get(k) for k in KEY)
        if key in index:
            data["rows"][index[key]] = r
        else:
            index[key] = len(data["rows"])
            data["rows"].append(r)
    data["commit"] = commit
    data["date"] = now()[:10]
    old = data.get("command") or ""
    data["command"] = old if command in old else "; ".join(x for x in (old, command) if x)
    write_json(path, data)
    return data
