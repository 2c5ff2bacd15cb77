"""SPMD sharding of the neighborhood-attention custom calls (natten_jax.sharding).

The checks run in one subprocess with 4 forced host (CPU) devices: the main pytest process has
already initialised JAX with one CPU device, and XLA_FLAGS must be set before JAX starts. The
FFI kernels cannot run on CPU, so the worker replaces the custom call of the fused backend
(``natten_jax._ffi.custom_call``, which ``_ffi.batched_call`` calls per shard) by a CPU
stand-in built on ``na_reference``, with the static problem rebuilt from the call's attributes
and the local (per-shard) shapes, and makes ``fused.can_run`` say yes: everything else (public
API, custom_vjp, custom_vmap, the partitioning wrapper, the fused backward call) is the real
fused path. A second probe lowers
the real FFI call itself and reads the partitioned HLO that XLA dumps before it fails to find
a CPU handler for our CUDA targets.

Too few devices (or no way to force them) skips; ``NATTEN_JAX_REQUIRE_SHARDING=1`` turns that
skip into a failure. The ``gpu`` test at the end runs the real kernels on >= 2 GPUs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from multidevice import N_DEVICES, run_worker
from natten_jax.config import ENV_VARS
from multidevice import skip_or_fail as _skip_or_fail  # noqa: F401

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute")
PROBE = "ffi_probe"  # name of the jitted functions whose HLO the worker dumps
TOL = 2e-5
GRAD_TOL = 1e-4




# =============================================================================================
# Worker (runs in the subprocess: ``python tests/test_sharding.py <hlo dump dir>``)


def _worker(dump_dir):  # noqa: C901 (one linear list of cases)
    import traceback

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < N_DEVICES:
        return {"skip": f"needs {N_DEVICES} devices, JAX sees {len(jax.devices())}"}

    import natten_jax
    from natten_jax import _ffi
    from natten_jax.backends import fused
    from natten_jax.checks import check_na_call
    from natten_jax.reference import na_reference

    seen = []  # (target, operand shapes) of every trace of the per-shard stand-in
    real_custom_call = _ffi.custom_call

    def standin_custom_call(target, out_types, attrs):
        """The fused backend's per-shard call with na_reference in place of the kernel."""
        rank = len(attrs["kernel_size"])
        ints = lambda a: tuple(int(x) for x in a)  # noqa: E731

        def local_problem(q, k, v):
            return check_na_call(rank, q, k, v, ints(attrs["kernel_size"]), ints(attrs["stride"]),
                                 ints(attrs["dilation"]),
                                 tuple(bool(c) for c in attrs["is_causal"]),
                                 float(attrs["scale"]))

        def checked(outs, xs):
            want = [(tuple(t.shape), t.dtype) for t in out_types(*xs)]
            got = [(tuple(o.shape), o.dtype) for o in outs]
            assert got == want, (target, got, want)
            return tuple(outs)

        # ``ext``: the optional valid_extent operand of a ragged call ([B, rank] int32).
        def forward(q, k, v, *ext):
            seen.append((target, [tuple(x.shape) for x in (q, k, v) + ext]))
            out = na_reference(local_problem(q, k, v), q, k, v, None, None, *ext)
            return checked(out, (q, k, v) + ext)

        def backward(q, k, v, dout, lse, delta, *ext):
            seen.append((target, [tuple(x.shape) for x in (q, k, v, dout, lse, delta) + ext]))
            p = local_problem(q, k, v)
            (out, _), vjp = jax.vjp(lambda q, k, v: na_reference(p, q, k, v, None, None, *ext),
                                    q, k, v)
            f32 = jnp.float32
            d_lse = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1) - delta
            return checked(vjp((dout, d_lse.astype(lse.dtype))),
                           (q, k, v, dout, lse, delta) + ext)

        # jit: na_reference closes over constant arrays, which custom_partitioning refuses.
        return jax.jit(forward if target == fused.TARGET else backward)

    _ffi.custom_call = standin_custom_call
    fused.can_run = lambda p: (True, "")

    def mesh(shape, names, explicit=False):
        t = AxisType.Explicit if explicit else AxisType.Auto
        return jax.make_mesh(shape, names, axis_types=(t,) * len(names))

    mesh1 = mesh((4,), ("x",))
    mesh2 = mesh((2, 2), ("x", "y"))

    def data(B, S, H, Hkv, D, N=0, dtype=jnp.float32, seed=0):
        rng = np.random.default_rng(seed)
        r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
        q, k, v = r(B, *S, H, D), r(B, *S, Hkv, D), r(B, *S, Hkv, D)
        extra = (r(B, N, Hkv, D), r(B, N, Hkv, D)) if N else (None, None)
        return q, k, v, extra

    NA_ARGS = dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), is_causal=(False, True))

    def na(backend, backward="kernel"):
        cfg = natten_jax.FusedConfig(backward=backward)

        def f(q, k, v, ek=None, ev=None, ext=None):
            return natten_jax.na2d(q, k, v, **NA_ARGS, additional_keys=ek, additional_values=ev,
                                   valid_extent=ext, backend=backend, backend_config=cfg,
                                   return_lse=True)
        return f

    def put(m, spec, x):
        return None if x is None else jax.device_put(x, NamedSharding(m, spec))

    def max_err(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))

    def spec(x):
        sp = tuple(x.sharding.spec)
        return [list(e) if isinstance(e, tuple) else e for e in sp + (None,) * (x.ndim - len(sp))]

    def colls(txt):
        return sorted(c for c in COLLECTIVES + ("all-reduce",) if c in txt)

    results = {}

    def case(name):
        def deco(fn):
            t0 = time.time()
            try:
                results[name] = fn()
            except Exception:  # reported by the pytest side
                results[name] = {"exception": traceback.format_exc()[-4000:]}
            results[name]["seconds"] = round(time.time() - t0, 2)
            return fn
        return deco

    # A ragged batch's valid_extent [B, rank] (all within the kernel-size-times-dilation bound).
    EXT = jnp.asarray([[6, 5], [4, 4], [3, 5], [5, 4]], jnp.int32)

    def forward_case(m, H, Hkv, spec_q, spec_kv, B=4, N=0, spec_x=None, backend="fused",
                     spec_e=None):
        q, k, v, (ek, ev) = data(B, (6, 5), H, Hkv, D, N)
        ext = EXT if spec_e is not None else None
        ref = na("reference")(q, k, v, ek, ev, ext)
        f = jax.jit(na(backend))
        args = [put(m, spec_q, q), put(m, spec_kv, k), put(m, spec_kv, v),
                put(m, spec_x or spec_kv, ek), put(m, spec_x or spec_kv, ev),
                put(m, spec_e, ext)]
        lowered = f.lower(*args)
        seen.clear()
        txt = lowered.compile().as_text()
        local = [s for _, s in seen]  # traced while partitioning: the per-shard shapes
        out = f(*args)
        return {"err": max(max_err(a, b) for a, b in zip(out, ref)), "collectives": colls(txt),
                "local": local, "out_spec": [spec(o) for o in out]}

    b_ = lambda e: P(e)  # noqa: E731  batch sharded
    h_ = lambda e: P(None, None, None, e)  # noqa: E731  heads sharded
    bh = lambda b, h: P(b, None, None, h)  # noqa: E731

    case("batch")(lambda: forward_case(mesh1, 4, 4, b_("x"), b_("x")))
    case("heads")(lambda: forward_case(mesh1, 8, 4, h_("x"), h_("x")))
    case("heads_gqa")(lambda: forward_case(mesh2, 8, 4, h_(("x", "y")), h_(("x", "y"))))
    # GQA with more head shards than kv heads: kv heads sharded on x, replicated over y.
    case("heads_gqa_shared")(lambda: forward_case(mesh2, 8, 2, h_(("x", "y")), h_("x")))
    case("heads_mqa")(lambda: forward_case(mesh1, 4, 1, h_("x"), P()))
    case("batch_heads")(lambda: forward_case(mesh2, 4, 2, bh("x", "y"), bh("x", "y")))
    case("batch_heads_extra")(
        lambda: forward_case(mesh2, 4, 2, bh("x", "y"), bh("x", "y"), N=3,
                             spec_x=P("x", None, "y")))
    # Inputs sharded where the kernel cannot be: the partitioner asks for them replicated.
    case("spatial")(lambda: forward_case(mesh2, 4, 4, P(None, "x"), P(None, "x")))
    case("heads_indivisible")(lambda: forward_case(mesh2, 6, 3, h_("x"), P()))
    # XLA partitions the pure-JAX reference backend itself.
    case("reference_backend")(
        lambda: forward_case(mesh2, 4, 2, bh("x", "y"), bh("x", "y"), backend="reference"))
    # Ragged: the valid_extent operand ("ext") follows the batch sharding, sharded or not.
    case("ragged_batch_heads")(
        lambda: forward_case(mesh2, 4, 2, bh("x", "y"), bh("x", "y"), spec_e=P("x")))
    case("ragged_ext_replicated")(
        lambda: forward_case(mesh2, 4, 2, bh("x", "y"), bh("x", "y"), spec_e=P()))
    case("ragged_heads")(lambda: forward_case(mesh1, 8, 4, h_("x"), h_("x"), spec_e=P()))

    @case("ragged_gspmd")
    def _():
        jax.config.update("jax_use_shardy_partitioner", False)
        try:
            return forward_case(mesh2, 8, 2, bh("x", "y"), bh("x", "y"), spec_e=P("x"))
        finally:
            jax.config.update("jax_use_shardy_partitioner", True)

    @case("explicit_axes")
    def _():
        m = mesh((2, 2), ("x", "y"), explicit=True)
        return forward_case(m, 4, 2, bh("x", "y"), bh("x", "y"))

    @case("gspmd")
    def _():
        jax.config.update("jax_use_shardy_partitioner", False)
        try:
            return forward_case(mesh2, 8, 2, bh("x", "y"), bh("x", "y"))
        finally:
            jax.config.update("jax_use_shardy_partitioner", True)

    @case("vmap")
    def _():
        # vmap folds the mapped axis into batch: a sharded mapped axis stays local.
        q, k, v, _ = data(8, (6, 5), 4, 2, D)
        split = lambda x: x.reshape((4, 2) + x.shape[1:])  # noqa: E731
        ref = jax.vmap(na("reference"))(split(q), split(k), split(v))
        f = jax.jit(jax.vmap(na("fused")))
        args = [put(mesh1, P("x"), split(x)) for x in (q, k, v)]
        lowered = f.lower(*args)
        seen.clear()
        txt = lowered.compile().as_text()
        local = [s for _, s in seen]
        out = f(*args)
        return {"err": max(max_err(a, b) for a, b in zip(out, ref)), "collectives": colls(txt),
                "local": local}

    @case("constraint")
    def _():
        # Unsharded inputs, shardings imposed inside the jitted function.
        q, k, v, _ = data(4, (6, 5), 4, 2, D)
        ref = na("reference")(q, k, v)
        sh = NamedSharding(mesh2, bh("x", "y"))
        f = jax.jit(lambda *xs: na("fused")(
            *[jax.lax.with_sharding_constraint(x, sh) for x in xs]))
        lowered = f.lower(q, k, v)
        seen.clear()
        txt = lowered.compile().as_text()
        local = [s for _, s in seen]
        out = f(q, k, v)
        return {"err": max(max_err(a, b) for a, b in zip(out, ref)), "collectives": colls(txt),
                "local": local, "out_spec": [spec(o) for o in out]}

    @case("shard_map")
    def _():
        # Inside a fully manual shard_map the call runs as is, on the manual shards.
        q, k, v, _ = data(4, (6, 5), 4, 2, D)
        ref = na("reference")(q, k, v)
        f = jax.jit(jax.shard_map(na("fused"), mesh=mesh1, in_specs=P("x"),
                                  out_specs=P("x")))
        args = [put(mesh1, P("x"), x) for x in (q, k, v)]
        seen.clear()
        out = f(*args)
        return {"err": max(max_err(a, b) for a, b in zip(out, ref)),
                "local": [s for _, s in seen]}

    def grad_case(mode, m, H, Hkv, spec_q, spec_kv, remat=False, spec_e=None):
        q, k, v, _ = data(4, (6, 5), H, Hkv, D, seed=1)
        ext = EXT if spec_e is not None else None
        rng = np.random.default_rng(2)
        wo = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
        wl = jnp.asarray(rng.standard_normal(q.shape[:-1]), jnp.float32)

        def loss(backend):
            def f(q, k, v, ext=None):
                out, lse = na(backend, backward=mode)(q, k, v, ext=ext)
                return jnp.sum(out * wo) + jnp.sum(jnp.sin(lse) * wl)
            return f

        ref_val, ref_grads = jax.value_and_grad(loss("reference"), (0, 1, 2))(q, k, v, ext)
        fused_loss = jax.checkpoint(loss("fused")) if remat else loss("fused")
        f = jax.jit(jax.value_and_grad(fused_loss, (0, 1, 2)))
        args = [put(m, spec_q, q), put(m, spec_kv, k), put(m, spec_kv, v), put(m, spec_e, ext)]
        lowered = f.lower(*args)
        seen.clear()
        txt = lowered.compile().as_text()
        local = [[t] + s for t, s in seen]
        val, grads = f(*args)
        errs = [max_err(val, ref_val)] + [max_err(a, b) for a, b in zip(grads, ref_grads)]
        return {"err": max(errs), "collectives": colls(txt), "local": local,
                "grad_specs": [spec(g) for g in grads]}

    case("grad_kernel_batch_heads")(
        lambda: grad_case("kernel", mesh2, 4, 2, bh("x", "y"), bh("x", "y")))
    case("grad_kernel_gqa_shared")(
        lambda: grad_case("kernel", mesh2, 8, 2, h_(("x", "y")), h_("x")))
    case("grad_kernel_checkpoint")(
        lambda: grad_case("kernel", mesh2, 4, 2, bh("x", "y"), bh("x", "y"), remat=True))
    case("grad_kernel_ragged")(
        lambda: grad_case("kernel", mesh2, 4, 2, bh("x", "y"), bh("x", "y"), spec_e=P("x")))
    case("grad_reference_batch_heads")(
        lambda: grad_case("reference", mesh2, 4, 2, bh("x", "y"), bh("x", "y")))

    @case("ffi_hlo")
    def _():
        # The real FFI calls (forward and fused backward), partitioned: XLA dumps the
        # optimised HLO of each probe, then fails to find a CPU handler for the CUDA target.
        _ffi.custom_call = real_custom_call
        try:
            q, k, v, _ = data(4, (6, 5), 8, 2, 32, dtype=jnp.float16)

            def ffi_probe(q, k, v):
                out, lse = na("fused")(q, k, v)
                return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

            probe = jax.jit(jax.value_and_grad(ffi_probe, (0, 1, 2)))
            args = [put(mesh2, bh("x", "y"), x) for x in (q, k, v)]
            try:
                txt = probe.lower(*args).compile().as_text()
            except Exception as e:  # expected on CPU: no handler for the CUDA targets
                txt, why = None, str(e)[:300]
            if txt is None:
                dumps = [f for f in os.listdir(dump_dir)
                         if PROBE in f and f.endswith("after_optimizations.txt")]
                if not dumps:
                    return {"exception": f"no HLO dump in {dump_dir}; compile said: {why}"}
                txt = open(os.path.join(dump_dir, sorted(dumps)[-1])).read()
            calls = []
            for line in txt.splitlines():
                if "custom_call_target=\"natten_jax_fna_" in line:
                    target = line.split("custom_call_target=\"")[1].split("\"")[0]
                    operands = line.split("custom-call(")[1].split(")")[0]
                    calls.append([target, line.split("=")[1].split("custom-call")[0].strip(),
                                  operands])
            return {"calls": calls, "collectives": colls(txt),
                    "custom_partitioning_left": "CustomSPMDPartitioning" in txt}
        finally:
            _ffi.custom_call = standin_custom_call

    return results


# =============================================================================================
# pytest side


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("hlo_dump"))
    return run_worker(__file__, "sharding", args=(dump,),
                      drop_env=tuple(ENV_VARS.values()),  # the config comes from the cases
                      xla_flags=(f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text",
                                 f"--xla_dump_hlo_module_re=.*{PROBE}.*"))


def _get(results, name):
    r = results[name]
    assert "exception" not in r, f"{name} raised in the worker:\n{r['exception']}"
    return r


def _shapes_of(r):
    return {tuple(tuple(s) for s in shapes) for shapes in r["local"]}


S, D = (6, 5), 32  # spatial extent and head dim (a built one: no padding) of the worker's cases


def _fwd_shapes(b, h, hkv):
    return ((b,) + S + (h, D), (b,) + S + (hkv, D), (b,) + S + (hkv, D))


# name: the per-shard q/k/v shapes the stand-in must see
FORWARD = {
    "batch": _fwd_shapes(1, 4, 4),
    "heads": _fwd_shapes(4, 2, 1),
    "heads_gqa": _fwd_shapes(4, 2, 1),
    "heads_gqa_shared": _fwd_shapes(4, 2, 1),
    "heads_mqa": _fwd_shapes(4, 1, 1),
    "batch_heads": _fwd_shapes(2, 2, 1),
    "batch_heads_extra": _fwd_shapes(2, 2, 1),
    "explicit_axes": _fwd_shapes(2, 2, 1),
    "gspmd": _fwd_shapes(2, 4, 1),
}


@pytest.mark.parametrize("name", sorted(FORWARD))
def test_forward_sharded(results, name):
    """Batch and/or heads sharded (GQA and MQA too): equal to the unsharded reference, each
    shard's call sees its local shapes, and no all-gather / all-to-all / collective-permute."""
    r = _get(results, name)
    shapes = FORWARD[name]
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {shapes}, (r["local"], shapes)
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]
    assert "all-reduce" not in r["collectives"], r["collectives"]


def test_forward_output_sharding(results):
    """Outputs keep the operands' batch/heads sharding."""
    want = [["x", None, None, "y", None], ["x", None, None, "y"]]
    assert _get(results, "batch_heads")["out_spec"] == want
    assert _get(results, "explicit_axes")["out_spec"] == want
    assert _get(results, "heads_gqa_shared")["out_spec"][0] == [None, None, None, ["x", "y"], None]


def test_spatial_sharding_is_gathered(results):
    """A spatially sharded input is replicated for the kernel (exact, with an all-gather)."""
    r = _get(results, "spatial")
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {_fwd_shapes(4, 4, 4)}, r["local"]
    assert "all-gather" in r["collectives"], r["collectives"]


def test_heads_not_dividing_kv_heads_are_gathered(results):
    """6 query / 3 kv heads over 2 shards would split a GQA group: heads are replicated."""
    r = _get(results, "heads_indivisible")
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {_fwd_shapes(4, 6, 3)}, r["local"]


def test_reference_backend_sharded(results):
    """natten_jax.na2d(backend="reference") under jit: XLA partitions it without gathers."""
    r = _get(results, "reference_backend")
    assert r["err"] <= TOL, r
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]
    assert r["out_spec"][0] == ["x", None, None, "y", None], r["out_spec"]


def test_vmap_sharded(results):
    """vmap over a sharded axis folds it into the (then sharded) batch: no collectives."""
    r = _get(results, "vmap")
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {((2,) + S + (4, D), (2,) + S + (2, D), (2,) + S + (2, D))}, r
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]


def _bwd_shapes(b, h, hkv):
    q, k, v = _fwd_shapes(b, h, hkv)
    return (q, k, v, q, q[:-1], q[:-1])


@pytest.mark.parametrize("name,b,h,hkv", [("grad_kernel_batch_heads", 2, 2, 1),
                                          ("grad_kernel_gqa_shared", 4, 2, 1),
                                          ("grad_kernel_checkpoint", 2, 2, 1)])
def test_value_and_grad_kernel_backward(results, name, b, h, hkv):
    """value_and_grad with the fused backward call (FusedConfig(backward="kernel")) through
    the custom_vjp: equal to single-device autodiff of the reference, per-shard forward and
    backward calls, and only the loss's (and, for kv heads shared by several head shards, the
    dk/dv) all-reduce."""
    r = _get(results, name)
    assert r["err"] <= GRAD_TOL, r
    fwd = {tuple(tuple(x) for x in s[1:]) for s in r["local"] if s[0] == "natten_jax_fna_forward"}
    bwd = {tuple(tuple(x) for x in s[1:]) for s in r["local"] if s[0] != "natten_jax_fna_forward"}
    assert fwd == {_fwd_shapes(b, h, hkv)}, r["local"]
    assert bwd == {_bwd_shapes(b, h, hkv)}, r["local"]
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]
    if name == "grad_kernel_gqa_shared":  # kv heads on x only, replicated over y
        q_spec, kv_spec = [None, None, None, ["x", "y"], None], [None, None, None, "x", None]
    else:
        q_spec = kv_spec = ["x", None, None, "y", None]
    assert r["grad_specs"] == [q_spec, kv_spec, kv_spec], r["grad_specs"]


# name: the per-shard q/k/v/valid_extent shapes the stand-in must see (a ragged call)
RAGGED = {
    "ragged_batch_heads": _fwd_shapes(2, 2, 1) + ((2, 2),),
    "ragged_ext_replicated": _fwd_shapes(2, 2, 1) + ((2, 2),),
    "ragged_heads": _fwd_shapes(4, 2, 1) + ((4, 2),),
    "ragged_gspmd": _fwd_shapes(2, 4, 1) + ((2, 2),),
}


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_ragged_forward_sharded(results, name):
    """A ragged call (valid_extent, array kind "ext"): the extents are split over batch like
    the query (batch-sharded or replicated on input; both Shardy and GSPMD), never over heads;
    equal to the unsharded reference, with no collectives, outputs keeping the batch/heads
    sharding."""
    r = _get(results, name)
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {RAGGED[name]}, (r["local"], RAGGED[name])
    assert not set(r["collectives"]) & set(COLLECTIVES + ("all-reduce",)), r["collectives"]
    if name != "ragged_heads":
        assert r["out_spec"][0] == ["x", None, None, "y", None], r["out_spec"]


def test_ragged_value_and_grad_sharded(results):
    """value_and_grad of a ragged call with batch and heads sharded: forward and backward calls
    each get their shard's extents, gradients equal the reference's, keep the inputs'
    sharding, and only the loss is all-reduced."""
    r = _get(results, "grad_kernel_ragged")
    assert r["err"] <= GRAD_TOL, r
    fwd = {tuple(tuple(x) for x in s[1:]) for s in r["local"] if s[0] == "natten_jax_fna_forward"}
    bwd = {tuple(tuple(x) for x in s[1:]) for s in r["local"] if s[0] != "natten_jax_fna_forward"}
    assert fwd == {_fwd_shapes(2, 2, 1) + ((2, 2),)}, r["local"]
    assert bwd == {_bwd_shapes(2, 2, 1) + ((2, 2),)}, r["local"]
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]
    assert r["grad_specs"] == [["x", None, None, "y", None]] * 3, r["grad_specs"]


def test_sharding_constraint_inside_jit(results):
    """Unsharded inputs constrained inside the jitted function partition the same way."""
    r = _get(results, "constraint")
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {_fwd_shapes(2, 2, 1)}, r["local"]
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]
    assert r["out_spec"][0] == ["x", None, None, "y", None], r["out_spec"]


def test_inside_shard_map(results):
    """In a fully manual shard_map the per-shard call is used directly, on the manual shards."""
    r = _get(results, "shard_map")
    assert r["err"] <= TOL, r
    assert _shapes_of(r) == {_fwd_shapes(1, 4, 2)}, r["local"]


def test_value_and_grad_reference_backward(results):
    """The reference VJP backward (FusedConfig(backward="reference"): pure JAX, partitioned by
    XLA) under sharding."""
    r = _get(results, "grad_reference_batch_heads")
    assert r["err"] <= GRAD_TOL, r
    assert r["grad_specs"] == [["x", None, None, "y", None]] * 3, r["grad_specs"]


def test_real_ffi_calls_partitioned(results):
    """The real FFI custom calls (forward and backward) in XLA's partitioned HLO: one each,
    with local operand shapes, and no gathers."""
    r = _get(results, "ffi_hlo")
    targets = sorted(c[0] for c in r["calls"])
    assert targets == ["natten_jax_fna_backward", "natten_jax_fna_forward"], r["calls"]
    for target, result_shape, operands in r["calls"]:
        # batch 4 over x (2), heads 8 over y (2): q [2, 6, 5, 4, 32]; kv heads 2 -> 1.
        assert "f16[2,6,5,4,32]" in result_shape, (target, result_shape)
        if target == "natten_jax_fna_backward":
            assert "f16[2,6,5,1,32]" in result_shape, (target, result_shape)
    assert not r["custom_partitioning_left"]
    assert not set(r["collectives"]) & set(COLLECTIVES), r["collectives"]


def test_worker_runtime(results):
    """Keeps the whole subprocess inside the CPU test budget."""
    assert results["_seconds"] < 120, results["_seconds"]


# =============================================================================================
# The real kernels on several GPUs.


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["reference", "kernel"])
def test_fused_sharded_gpus(backward):
    """The real kernels with batch or heads (GQA) sharded over 2 GPUs: forward and gradients
    equal the unsharded fused call's, and the HLO has no gathers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import natten_jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        _skip_or_fail(f"needs 2 GPUs, JAX sees {len(gpus)}")
    cfg = natten_jax.FusedConfig(backward=backward)
    n = 2
    m = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,), devices=gpus[:n])
    rng = np.random.default_rng(0)
    B, S, H, Hkv, D = 2 * n, (24, 20), 4 * n, 2 * n, 64
    q = jnp.asarray(rng.standard_normal((B,) + S + (H, D)), jnp.float16)
    k = jnp.asarray(rng.standard_normal((B,) + S + (Hkv, D)), jnp.float16)
    v = jnp.asarray(rng.standard_normal((B,) + S + (Hkv, D)), jnp.float16)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        out, lse = natten_jax.na2d(q, k, v, 7, dilation=2, backend="fused", backend_config=cfg,
                                   return_lse=True)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse), (out, lse)

    f = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
    ref = jax.jit(f)(q, k, v)
    for spec in (P("x"), P(None, None, None, "x")):
        args = [jax.device_put(x, NamedSharding(m, spec)) for x in (q, k, v)]
        g = jax.jit(f)
        txt = g.lower(*args).compile().as_text()
        assert not [c for c in COLLECTIVES if c in txt], spec
        got = g(*args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    out = _worker(sys.argv[1])
    print("RESULTS " + json.dumps(out))
