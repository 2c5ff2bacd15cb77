"""Auto-tuning of the fused kernels' tile shapes, with a cache on disk shared by processes.

The fused forward and backward kernels take a Q tile and a KV box shape (log2 extents per axis,
see :mod:`natten_jax.tiles`). By default the shape comes from the cost model of
:func:`natten_jax.tiles.choose_tiles`. The auto-tuner times candidate shapes on the device
instead and remembers the fastest one per problem.

Modes, from the ``mode`` argument of :func:`select_tiles` or else the problem's configuration
(``p.config.autotune``, :class:`natten_jax.config.FusedConfig`):

* ``off`` (default): the cost model's choice, nothing is timed and no file is touched;
* ``on``: time the :data:`TOP_K` best candidates by the cost model (the model's own choice
  always among them) and keep the fastest;
* ``thorough``: time every legal candidate (for 3-D problems up to 1,792 forward shapes, each
  compiled once: minutes per problem).

Tuning happens at trace time, on fresh random inputs of the problem's shapes (never on the
traced operands), so it needs memory for one more set of the problem's Q, K, V (and O, dO for
the backward) on the device while it runs. The tile shape only changes how the kernel
partitions the work: every shape computes the same attention, masked exactly, so tuning never
changes results beyond floating-point reassociation (the order in which the online softmax
accumulates KV boxes).

This module times nothing itself: the caller passes a ``timer(p, tiles, backward, impl=...)
-> seconds`` (the fused backend passes :func:`natten_jax.backends.fused.time_kernel`, built on
:func:`random_operands` and :func:`measure` here), so it does not import the backend.

Kernel implementations (``FusedConfig.forward_impl`` / ``backward_impl``): tiles are tuned per
implementation (each entry is keyed with its ``impl``); :func:`select_config` also picks the
forward implementation, timing both when the setting is ``auto`` and tuning is on.

Winners are stored in ``<cache_dir>/autotune-v2.json`` (``FusedConfig.cache_dir``, default
``~/.cache/natten_jax``), keyed by the device kind, dtype, shapes, window parameters, direction,
the configuration fields that change which kernel runs (implementation, Q tile, occupancy), for
float32 inputs the precision (their TF32 and 3xTF32 kernels; sm80 only, 64-token Q tiles) and
the natten_jax version (:func:`problem_key`). The file is read once per process (then kept in
memory) and written atomically (a temporary file in the same directory, then ``os.replace``),
merging with what other processes wrote in the meantime. Processes that need the same key at
the same time serialise on an exclusive ``fcntl`` lock: the first one tunes, the others wait and
then read its winner instead of timing again. An unreadable or corrupt cache gives a warning and
counts as empty; a cache that cannot be written gives a warning and the winner lives in memory
only. Tuning failures never stop the program: a candidate whose timing fails is skipped, and if
none can be timed the cost model's choice is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

try:  # POSIX; elsewhere processes do not coordinate (each may tune once)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from natten_jax import tiles
from natten_jax.checks import NAProblem
from natten_jax.config import AUTOTUNE_MODES as MODES
from natten_jax.config import FusedConfig, default_config

# v2 (2026-12-03): the sm90 forward's candidates include 128-key boxes, which v1's winners
# were never timed against, so they are not reused.
CACHE_FILE = "autotune-v2.json"
CACHE_FORMAT = 1
TOP_K = 6  # candidates timed in mode "on"
# A timed candidate (tiles, or a kernel implementation) replaces the cost model's choice only when
# it is faster by more than this share: closer than that is timing noise (run-to-run spread on
# the H100 ~1%; device run 5 of 2026-11-23 "tuned" 2d_nat_t to tiles 4% slower on a 0.4% lead).
TUNE_MARGIN = 0.02

Tiles = Tuple[Tuple[int, ...], Tuple[int, ...]]
# timer(p, tiles, backward, impl=kernel) -> seconds per call of that kernel with those tiles
Timer = Callable[..., float]

_MODE_RANK = {"on": 1, "thorough": 2}  # an entry tuned in a mode serves that mode and below

# In-memory state: cache path -> {key: entry}, the paths already read from disk, and one
# threading lock per (path, key) so that threads of one process also tune a key only once.
_state_lock = threading.Lock()
_memory: Dict[str, Dict[str, dict]] = {}
_key_locks: Dict[Tuple[str, str], threading.Lock] = {}
# Every candidate this process has timed (see timing_log): shows whether a process tuned or
# reused the cache.
_timing_log: List[dict] = []


# ----------------------------------------------------------------------------------------------
# Mode, key, candidates


def resolve_mode(p: NAProblem, mode: Optional[str] = None) -> str:
    """``mode`` if given (validated), else ``p.config.autotune``."""
    if mode is None:
        return p.config.autotune
    m = str(mode).strip().lower()
    if m not in MODES:
        raise ValueError(f"autotune `mode` must be one of {MODES}, got {mode!r}")
    return m


def device_kind() -> str:
    """The kind of device the kernels run on (the first GPU, else JAX's first device)."""
    import jax

    try:
        return str(jax.devices("gpu")[0].device_kind)
    except Exception:  # noqa: BLE001 (no GPU backend: "Unknown backend", init failures)
        return str(jax.devices()[0].device_kind)


def _axes(xs) -> str:
    return "x".join(str(int(x)) for x in xs)


def problem_key(p: NAProblem, backward: bool = False, *, device: Optional[str] = None,
                impl: Optional[str] = None) -> str:
    """Stable string naming everything the fastest tile shape may depend on: the device, the
    problem, the direction, the kernel (``impl``; None: the one ``p.config`` selects) and the
    configuration fields that change the kernel or its candidates (``q_tile`` and
    ``sm80_occupancy`` of the forward, where set)."""
    import natten_jax

    impl = _impl(p, backward, impl)
    parts = [
        f"device={device if device is not None else device_kind()}",
        f"dtype={p.dtype}",
        f"dir={'backward' if backward else 'forward'}",
        f"spatial={_axes(p.spatial)}",
        f"kernel={_axes(p.kernel_size)}",
        f"stride={_axes(p.stride)}",
        f"dilation={_axes(p.dilation)}",
        f"causal={_axes(p.is_causal)}",
        f"head_dim={p.head_dim}",
        f"head_dim_v={p.head_dim_v}",
        f"heads={p.heads}",
        f"heads_kv={p.heads_kv}",
        f"batch={p.batch}",
        f"natten_jax={natten_jax.__version__}",
        f"impl={impl}",
    ]
    if not backward and p.config.q_tile is not None:  # restricts the candidates
        parts.append(f"q_tile={p.config.q_tile}")
    if not backward and impl == "sm80" and p.config.sm80_occupancy is not None:
        parts.append(f"sm80_occupancy={p.config.sm80_occupancy}")
    if tiles.is_float32(p.dtype):  # 1xTF32 and 3xTF32 products are different kernels
        parts.append(f"precision={p.precision}")
    return "|".join(parts)


def _impl(p: NAProblem, backward: bool, impl: Optional[str]) -> str:
    """``impl``, or the kernel ``p.config`` selects for this direction."""
    if impl is not None:
        if impl not in tiles.IMPLS:
            raise ValueError(f"`impl` must be None or one of {tiles.IMPLS}, got {impl!r}")
        return impl
    return bwd_impl(p.head_dim, p.config, p.dtype) if backward else resolve_impl(p)


def _q_sizes(p: NAProblem, backward: bool) -> Tuple[int, ...]:
    """Log2 Q tile sizes the kernel accepts: forward 64 or 128 tokens (as restricted by
    ``p.config.q_tile``; float32: 64), backward 64."""
    return ((tiles.Q_TILE_LOG2[0],) if backward
            else tiles.q_tile_sizes(p.config.q_tile, p.dtype))


def _heuristic(p: NAProblem, backward: bool, impl: str = "sm80") -> Tiles:
    qt, kt = tiles.choose_tiles(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                p.head_dim, backward=backward, impl=impl, q_tile=p.config.q_tile,
                                dtype=p.dtype)
    return tuple(qt), tuple(kt)


def candidates(p: NAProblem, backward: bool = False, mode: str = "thorough",
               top_k: int = TOP_K, impl: Optional[str] = None) -> List[Tiles]:
    """Legal (q_tile, kv_tile) log2 shapes, best first by the cost model (visited pairs x the
    per-pair cost of the Q tile size of kernel ``impl``, None: the one ``p.config`` selects;
    ties as in ``choose_tiles``). Mode ``on``: the first ``top_k``, always including the cost
    model's choice; ``thorough``: all of them."""
    impl = _impl(p, backward, impl)
    ranked = []
    for qt, kt in tiles.tile_shapes(p.rank, _q_sizes(p, backward), impl, backward):
        cost = _modelled_cost(p, "sm80" if backward else impl, (qt, kt))
        order = (cost, tuple(-x for x in reversed(qt)), tuple(-x for x in reversed(kt)))
        ranked.append((order, (tuple(qt), tuple(kt))))
    ranked.sort()
    out = [t for _, t in ranked]
    if mode == "thorough":
        return out
    chosen = out[:max(1, int(top_k))]
    h = _heuristic(p, backward, impl)
    if h not in chosen:  # cannot happen with the shared ordering; kept as a guarantee
        chosen[-1] = h
    return chosen


def _legal(p: NAProblem, backward: bool, t, impl: str) -> Optional[Tiles]:
    """``t`` (from the cache file) as a Tiles tuple if kernel ``impl`` accepts it, else None."""
    try:
        qt, kt = (tuple(int(x) for x in t[0]), tuple(int(x) for x in t[1]))
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    if len(qt) != p.rank or len(kt) != p.rank or min(qt + kt) < 0:
        return None
    if (sum(qt) not in _q_sizes(p, backward)
            or sum(kt) not in tiles.kv_tile_sizes(sum(qt), impl, backward)):
        return None
    return qt, kt


# ----------------------------------------------------------------------------------------------
# Cache file


def cache_dir(config: Optional[FusedConfig] = None) -> str:
    """The cache directory of ``config`` (None: :func:`natten_jax.config.default_config`):
    its ``cache_dir``, else ``~/.cache/natten_jax``; absolute, ``~`` expanded."""
    d = (config if config is not None else default_config()).cache_dir
    return os.path.abspath(os.path.expanduser(d or os.path.join("~", ".cache", "natten_jax")))


def cache_path(config: Optional[FusedConfig] = None) -> str:
    """The cache file of ``config`` (None: :func:`natten_jax.config.default_config`)."""
    return os.path.join(cache_dir(config), CACHE_FILE)


def clear_memory_cache() -> None:
    """Forget what this process has read or tuned (the file on disk is kept)."""
    with _state_lock:
        _memory.clear()
        _key_locks.clear()


def timing_log() -> List[dict]:
    """The candidates this process has timed (or tried to) since it started, oldest first:
    dicts with ``problem`` (its :func:`problem_key`), ``tiles`` and ``mode``. Empty while
    every choice came from the cost model or a cache, so ``len(timing_log())`` tells whether a
    process re-timed anything."""
    with _state_lock:
        return [dict(e) for e in _timing_log]


def _note_timed(p: NAProblem, backward: bool, mode: str, t, impl: str) -> None:
    entry = {"problem": problem_key(p, backward, impl=impl), "tiles": t, "mode": mode}
    with _state_lock:
        _timing_log.append(entry)


def _read_file(path: str) -> Dict[str, dict]:
    """Entries of the cache file; {} (with a warning) if it is unreadable or corrupt."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"natten_jax autotune cache {path} is unreadable ({type(e).__name__}: {e});"
                      f" treating it as empty", RuntimeWarning, stacklevel=3)
        return {}
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT
            and isinstance(data.get("entries"), dict)):
        warnings.warn(f"natten_jax autotune cache {path} has an unknown layout; treating it as "
                      f"empty", RuntimeWarning, stacklevel=3)
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and isinstance(v, dict)}


def _write_atomic(path: str, entries: Dict[str, dict]) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(lock_path: str):
    """Exclusive ``flock`` on ``lock_path`` (created if needed); a no-op where it cannot be had
    (no fcntl, or an unwritable directory: that process then works without coordination)."""
    fd = None
    if fcntl is not None:
        try:
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if fd is not None:
                os.close(fd)
                fd = None
            warnings.warn(f"natten_jax autotune: cannot lock {lock_path} ({e}); tuning without "
                          f"coordination with other processes", RuntimeWarning, stacklevel=4)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _key_lock_path(path: str, key: str) -> str:
    h = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(os.path.dirname(path), "locks", f"autotune-{h}.lock")


def _persist(path: str, key: str, entry: dict) -> None:
    """Merge ``entry`` into the file under its lock (re-read, add, atomic replace)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            entries = _read_file(path)
            entries[key] = entry
            _write_atomic(path, entries)
    except OSError as e:
        warnings.warn(f"natten_jax autotune: cannot write {path} ({e}); the result is kept for "
                      f"this process only", RuntimeWarning, stacklevel=3)


def _memory_for(path: str) -> Dict[str, dict]:
    """This process's entries for ``path``, read from disk on first use."""
    with _state_lock:
        mem = _memory.get(path)
    if mem is None:
        loaded = _read_file(path)
        with _state_lock:
            mem = _memory.setdefault(path, loaded)
    return mem


def _usable(p: NAProblem, backward: bool, entry: Optional[dict], mode: str,
            impl: str) -> Optional[Tiles]:
    if not entry or _MODE_RANK.get(entry.get("mode"), 0) < _MODE_RANK[mode]:
        return None
    return _legal(p, backward, (entry.get("q_tile"), entry.get("kv_tile")), impl)


# ----------------------------------------------------------------------------------------------
# Selection and tuning


def select_tiles(p: NAProblem, *, backward: bool = False, mode: Optional[str] = None,
                 timer: Optional[Timer] = None, top_k: int = TOP_K,
                 impl: Optional[str] = None) -> Tiles:
    """(q_tile, kv_tile) log2 extents per axis for the fused kernel on ``p``.

    ``mode`` (None: ``p.config.autotune``) ``off``: :func:`natten_jax.tiles.choose_tiles`.
    Otherwise the cached winner for :func:`problem_key` in ``p.config``'s cache directory,
    tuning now (see the module docstring) if there is none: ``timer(p, tiles, backward,
    impl=impl) -> seconds`` times one candidate (required then). ``impl``: the kernel the tiles
    are for (``sm80`` or ``sm90``; forward or backward, as ``backward`` says; None: the one
    ``p.config`` selects); sm90 entries are cached apart from sm80's.
    """
    mode = resolve_mode(p, mode)
    impl = _impl(p, backward, impl)
    if mode == "off":
        return _heuristic(p, backward, impl)
    if timer is None:
        raise TypeError(f"select_tiles: autotune mode {mode!r} times candidates and needs a "
                        f"`timer` (natten_jax.backends.fused.time_kernel times the kernels)")
    path = cache_path(p.config)
    key = problem_key(p, backward, impl=impl)
    entry = _memory_for(path).get(key)
    if entry is not None and entry.get("failed"):  # nothing could be timed in this process
        return _heuristic(p, backward, impl)
    got = _usable(p, backward, entry, mode, impl)
    if got is not None:
        return got
    with _state_lock:
        tlock = _key_locks.setdefault((path, key), threading.Lock())
    with tlock, _file_lock(_key_lock_path(path, key)):
        # Another thread or process may have tuned this key while we waited for the locks.
        mem = _memory_for(path)
        got = _usable(p, backward, mem.get(key), mode, impl)
        if got is None:
            disk = _read_file(path).get(key)
            got = _usable(p, backward, disk, mode, impl)
            if got is not None:
                mem[key] = disk
        if got is not None:
            return got
        entry = _tune(p, backward, mode, timer, top_k, impl)
        mem[key] = entry
        if entry.get("failed"):
            return _heuristic(p, backward, impl)
        _persist(path, key, entry)
        return _usable(p, backward, entry, mode, impl)


def _pick(times: Dict, preferred, order: Callable):
    """The fastest key of ``times`` (ties by ``order``), or ``preferred`` (the cost model's
    choice) when it is within TUNE_MARGIN of the fastest."""
    best = min(times, key=lambda k: (times[k], order(k)))
    if preferred in times and times[preferred] <= times[best] * (1 + TUNE_MARGIN):
        return preferred
    return best


def _tune(p: NAProblem, backward: bool, mode: str, timer: Timer, top_k: int,
          impl: str) -> dict:
    cands = candidates(p, backward, mode, top_k, impl)
    heuristic = _heuristic(p, backward, impl)
    times: Dict[Tiles, float] = {}
    failures = []
    try:
        for t in cands:
            _note_timed(p, backward, mode, t, impl)
            try:
                s = float(timer(p, t, backward, impl=impl))
            except Exception as e:  # noqa: BLE001 (a failed candidate must not stop the program)
                failures.append(f"{t}: {type(e).__name__}: {e}")
                continue
            if math.isfinite(s) and s >= 0:
                times[t] = s
            else:
                failures.append(f"{t}: timer returned {s!r}")
    finally:
        _release_inputs()
    if failures:
        warnings.warn(f"natten_jax autotune: {len(failures)} of {len(cands)} candidates could not "
                      f"be timed ({failures[0]}{' ...' if len(failures) > 1 else ''})",
                      RuntimeWarning, stacklevel=3)
    if not times:  # keep the cost model's choice for this process, do not persist
        return {"mode": mode, "failed": True}
    best = _pick(times, heuristic, cands.index)
    return {
        "mode": mode,
        "q_tile": list(best[0]),
        "kv_tile": list(best[1]),
        "seconds": times[best],
        "heuristic": [list(heuristic[0]), list(heuristic[1])],
        "heuristic_seconds": times.get(heuristic),
        "timed": len(times),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------------
# Timing harness: fresh operands and a timing loop (the kernels are the caller's, see
# natten_jax.backends.fused.time_kernel)


_inputs_lock = threading.Lock()
_inputs: Dict[str, object] = {}  # at most one problem's random operands, freed after tuning


def _release_inputs() -> None:
    with _inputs_lock:
        _inputs.clear()


def random_operands(p: NAProblem, backward: bool, forward: Optional[Callable] = None):
    """Concrete device arrays of ``p``'s shapes: normal(0, 1) Q, K, V (and dO), never zero
    arrays; the backward also gets O and LSE from ``forward(q, k, v) -> (out, lse)`` (the
    kernel's forward; required when ``backward``) and delta = rowsum(dO * O). Reused across
    the candidates of one tuning run (released when it ends). Call it under
    ``jax.ensure_compile_time_eval()`` at trace time."""
    import jax
    import jax.numpy as jnp

    if backward and forward is None:
        raise TypeError("random_operands: the backward's operands need `forward`")
    tag = repr((p, backward))
    with _inputs_lock:
        if _inputs.get("tag") == tag:
            return _inputs["args"]
        _inputs.clear()
    dtype = jnp.dtype(p.dtype)
    q_shape = (p.batch,) + tuple(p.spatial) + (p.heads, p.head_dim)
    k_shape = (p.batch,) + tuple(p.spatial) + (p.heads_kv, p.head_dim)
    v_shape = (p.batch,) + tuple(p.spatial) + (p.heads_kv, p.head_dim_v)
    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    keys = jax.random.split(jax.random.key(seed), 4)
    normal = jax.jit(lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype),
                     static_argnums=1)
    q, k, v = normal(keys[0], q_shape), normal(keys[1], k_shape), normal(keys[2], v_shape)
    if backward:
        out, lse = jax.jit(forward)(q, k, v)
        dout = normal(keys[3], q_shape)
        delta = jax.jit(lambda d, o: jnp.sum(d.astype(jnp.float32) * o.astype(jnp.float32),
                                             axis=-1))(dout, out)
        args = (q, k, v, dout, lse, delta)
    else:
        args = (q, k, v)
    jax.block_until_ready(args)
    with _inputs_lock:
        _inputs["tag"], _inputs["args"] = tag, args
    return args


def measure(fn: Callable, args, *, reps: int = 5, target_s: float = 0.01) -> float:
    """Seconds per call of ``fn(*args)``: one compile-and-run warm-up, one sizing run, then the
    median of ``reps`` timed batches of back-to-back calls (about ``target_s`` each) ended by
    ``block_until_ready``."""
    import jax

    jax.block_until_ready(fn(*args))  # compile + first run
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(100, int(target_s / one)))
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# Kernel implementation (sm90 hook)


def hopper_device() -> bool:
    """Whether the first GPU has compute capability 9.0 (where the sm90 kernel runs)."""
    import jax

    try:
        return str(getattr(jax.devices("gpu")[0], "compute_capability", "")) == "9.0"
    except Exception:  # noqa: BLE001 (no GPU backend)
        return False


def compute_capability() -> Optional[Tuple[int, int]]:
    """(major, minor) compute capability of the first GPU, None without one (or where JAX's
    device does not say)."""
    import jax

    try:
        cc = str(getattr(jax.devices("gpu")[0], "compute_capability", ""))
        major, minor = cc.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 (no GPU backend, or no compute_capability)
        return None


def sm90_runs() -> bool:
    """Whether the sm90 kernels can run here: a compute capability 9.0 GPU and a module with
    sm_90a code (what ``auto`` needs; an explicit ``sm90`` setting is refused by the custom call
    where they cannot run)."""
    from natten_jax import _ffi

    return hopper_device() and any(a.startswith("90a") for a in _ffi.cuda_compiled_archs())


def impl_candidates(head_dim: int, config: FusedConfig, dtype=None) -> Tuple[str, ...]:
    """Forward kernels ``config.forward_impl`` allows at ``head_dim`` for inputs of ``dtype``
    (sm90 only for its head dims and never for float32; under ``auto`` only where
    :func:`sm90_runs`)."""
    setting = config.forward_impl
    sm90 = tiles.impl_supports("sm90", head_dim, dtype)
    if setting == "sm90":
        return ("sm90",) if sm90 else ("sm80",)
    if setting == "auto" and sm90 and sm90_runs():
        return ("sm80", "sm90")
    return ("sm80",)


def bwd_impl(head_dim: int, config: FusedConfig, dtype=None) -> str:
    """The backward kernels ``config.backward_impl`` selects at ``head_dim``: sm90 where the
    setting is ``sm90``, or ``auto`` and :func:`sm90_runs`, and sm90 has the head dim (and the
    dtype: never float32); else sm80. (No cost model or timing: where both run, the sm90
    kernels measured 2.0-2.6x faster.)"""
    s = config.backward_impl
    if tiles.impl_supports("sm90", head_dim, dtype) and (s == "sm90" or (s == "auto" and sm90_runs())):
        return "sm90"
    return "sm80"


def _modelled_cost(p: NAProblem, impl: str, t: Tiles) -> float:
    pairs = tiles.visited_pairs(tuple(p.spatial), tuple(p.kernel_size), tuple(p.stride),
                                tuple(p.dilation), tuple(p.is_causal), tuple(t[0]), tuple(t[1]))
    return pairs * tiles._pair_cost(sum(t[0]), p.head_dim, impl, sum(t[1]))


def resolve_impl(p: NAProblem) -> str:
    """The forward kernel for ``p`` without timing: the cost model's choice among
    :func:`impl_candidates` of ``p.config``."""
    impls = impl_candidates(p.head_dim, p.config, p.dtype)
    if len(impls) == 1:
        return impls[0]
    return min(impls, key=lambda i: _modelled_cost(p, i, _heuristic(p, False, i)))


def select_config(p: NAProblem, *, mode: Optional[str] = None, timer: Optional[Timer] = None,
                  top_k: int = TOP_K, impl: Optional[str] = None) -> Tuple[str, Tiles]:
    """(impl, (q_tile, kv_tile)) of the forward kernel for ``p``.

    ``impl`` given: its tiles (:func:`select_tiles`). Otherwise over :func:`impl_candidates` of
    ``p.config``: with tuning off the cost model's choice; with tuning on each implementation's
    tiles are tuned (and cached) with ``timer`` and the faster winner is taken.
    """
    impls = (impl,) if impl is not None else impl_candidates(p.head_dim, p.config, p.dtype)
    if len(impls) == 1:
        return impls[0], select_tiles(p, mode=mode, timer=timer, top_k=top_k, impl=impls[0])
    if resolve_mode(p, mode) == "off":
        best = resolve_impl(p)
        return best, _heuristic(p, False, best)
    tiles_of, seconds_of = {}, {}
    for i in impls:
        tiles_of[i] = select_tiles(p, mode=mode, timer=timer, top_k=top_k, impl=i)
        entry = _memory_for(cache_path(p.config)).get(problem_key(p, False, impl=i)) or {}
        seconds = entry.get("seconds")
        seconds_of[i] = seconds if isinstance(seconds, (int, float)) else math.inf
    best = _pick(seconds_of, resolve_impl(p), impls.index)
    return best, tiles_of[best]
