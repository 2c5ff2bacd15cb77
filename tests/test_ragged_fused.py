"""Ragged batches (issue 24) in the fused backend: ``valid_extent`` / ``additional_lengths``.

CPU tests check the backend's Python side with the custom call (``_ffi.custom_call``) replaced
by a NumPy emulation of the ragged kernels (:func:`emulated_call`: each sample cropped to its
clamped extent, NATTEN's mask from tests/oracle.py, zeros at padded tokens, padding never
read), so that what the custom calls receive (the trailing int32 ``[B, rank]`` operand, folded
under vmap), the extra-token masking, the zeroing at padded queries and the VJP plumbing are
checked against :func:`ragged_oracle.crop_oracle`. The real custom calls are lowered (not run)
to check their operands.

GPU tests (marked ``gpu``) run the ragged kernels (sm80, and sm90 at head dims 64 / 128) with
outputs poisoned and NaN in the padding, and compare out, lse and dq / dk / dv per element with
FlashAttention's rule (:func:`oracle.assert_close_to_ref64`) against ``crop_oracle`` in float64
and in the inputs' precision. Shapes are shared between cases so that compilation stays cheap.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
import ragged_oracle
from natten_jax import FusedConfig, _ffi
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.window import sample_extent

fused.POISON_OUTPUTS = True  # every output element must be written by the kernels

CPU = jax.devices("cpu")[0]
NOTUNE = FusedConfig(forward_impl="sm80", backward_impl="sm80", backward="kernel",
                     autotune="off")


# ---------------------------------------------------------------------------------------------
# CPU: the custom calls emulated in NumPy


def _ints(a):
    return tuple(int(x) for x in a)


def _sample(attrs, shape, ext_row):
    """The clamped extent of one sample and NATTEN's mask on it ([T, T] over its tokens)."""
    ks, di = _ints(attrs["kernel_size"]), _ints(attrs["dilation"])
    e = _ints(sample_extent(np.asarray(ext_row, np.int64), ks, di, shape))
    mask = oracle.na_mask(e, ks, _ints(attrs["stride"]), di,
                          tuple(bool(c) for c in attrs["is_causal"]))
    return e, mask


def _crop(x, b, e):
    """Sample ``b`` of ``x`` [B, *S, H, D] cropped to ``e``, as float64 [T, H, D]."""
    c = np.asarray(x[(b,) + tuple(slice(0, n) for n in e)], np.float64)
    return c.reshape((-1,) + c.shape[-2:])


def _place(dst, b, e, val):
    dst[(b,) + tuple(slice(0, n) for n in e)] = val.reshape(e + val.shape[1:])


def _emulated_forward(attrs, q, k, v, ext=None):
    B, S = q.shape[0], q.shape[1:-2]
    H, Hkv = q.shape[-2], k.shape[-2]
    G = H // Hkv
    scale = float(attrs["scale"])
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros(q.shape[:-1], np.float64)
    for b in range(B):
        e, mask = _sample(attrs, S, S if ext is None else ext[b])
        qb, kb, vb = _crop(q, b, e), _crop(k, b, e), _crop(v, b, e)
        kb, vb = np.repeat(kb, G, axis=1), np.repeat(vb, G, axis=1)
        s = np.where(mask[None], scale * np.einsum("qhd,khd->hqk", qb, kb), -np.inf)
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        tot = p.sum(-1, keepdims=True)
        _place(out, b, e, np.einsum("hqk,khe->qhe", p / tot, vb))
        _place(lse, b, e, (m + np.log(tot))[..., 0].T)
    return out.astype(q.dtype), lse.astype(np.float32)


def _emulated_backward(attrs, q, k, v, dout, lse, delta, ext=None):
    B, S = q.shape[0], q.shape[1:-2]
    H, Hkv = q.shape[-2], k.shape[-2]
    G = H // Hkv
    scale = float(attrs["scale"])
    dq, dk, dv = (np.zeros(x.shape, np.float64) for x in (q, k, v))
    for b in range(B):
        e, mask = _sample(attrs, S, S if ext is None else ext[b])
        qb, kb, vb, dob = (_crop(x, b, e) for x in (q, k, v, dout))
        lb, db = (np.asarray(x[(b,) + tuple(slice(0, n) for n in e)], np.float64).reshape(-1, H)
                  for x in (lse, delta))
        kr, vr = np.repeat(kb, G, axis=1), np.repeat(vb, G, axis=1)
        s = np.where(mask[None], scale * np.einsum("qhd,khd->hqk", qb, kr), -np.inf)
        p = np.exp(s - lb.T[..., None])
        dp = np.einsum("qhe,khe->hqk", dob, vr)
        ds = p * (dp - db.T[..., None])
        _place(dq, b, e, scale * np.einsum("hqk,khd->qhd", ds, kr))
        dkr = scale * np.einsum("hqk,qhd->khd", ds, qb)
        dvr = np.einsum("hqk,qhe->khe", p, dob)
        _place(dk, b, e, dkr.reshape(dkr.shape[0], Hkv, G, -1).sum(2))
        _place(dv, b, e, dvr.reshape(dvr.shape[0], Hkv, G, -1).sum(2))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@pytest.fixture
def emulated(monkeypatch):
    """The fused backend's custom calls emulated on the CPU (float64 inside); returns the list
    of (target, [(shape, dtype) of each operand]) of every traced call."""
    calls = []

    def standin(target, out_types, attrs):
        fn = _emulated_forward if target == fused.TARGET else _emulated_backward

        def call(*xs):
            calls.append((target, [(tuple(x.shape), jnp.dtype(x.dtype).name) for x in xs]))
            host = lambda *a: fn(attrs, *(np.asarray(x) for x in a))  # noqa: E731
            return jax.pure_callback(host, out_types(*xs), *xs)
        return call

    monkeypatch.setattr(_ffi, "custom_call", standin)
    monkeypatch.setattr(fused, "can_run", lambda p: (True, ""))
    return calls


def _data(seed, B, S, H, Hkv, D, N=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k, v = r(B, *S, H, D), r(B, *S, Hkv, D), r(B, *S, Hkv, D)
    extra = (r(B, N, Hkv, D), r(B, N, Hkv, D)) if N else (None, None)
    return q, k, v, extra


NA = dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), is_causal=(False, True))


def _problem(q, k, v, ek=None, ev=None, ragged=True, ragged_extra=False, config=NOTUNE, **na):
    na = na or NA
    rank = q.ndim - 3
    p = check_na_call(rank, q, k, v, na["kernel_size"], na.get("stride", 1),
                      na.get("dilation", 1), na.get("is_causal", False), na.get("scale"), ek, ev,
                      config)
    return dataclasses.replace(p, ragged=ragged, ragged_extra=ragged_extra)


def _fused(p, ext, lens):
    """(q, k, v, ek, ev) -> (out, lse) through fused.run on ``p``."""
    def f(q, k, v, ek=None, ev=None):
        return fused.run(p, q, k, v, ek, ev,
                         valid_extent=None if ext is None else jnp.asarray(ext, jnp.int32),
                         additional_lengths=None if lens is None else jnp.asarray(lens, jnp.int32))
    return f


def _oracle(ext, lens, na=None):
    def f(q, k, v, ek=None, ev=None):
        return ragged_oracle.crop_oracle(q.ndim - 3, q, k, v, ext, additional_keys=ek,
                                         additional_values=ev, additional_lengths=lens,
                                         **(na or NA))
    return f


def _close(got, want, tol=2e-5, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite elements"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=name)


def _cotangents(seed, q):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(q.shape), jnp.float32),
            jnp.asarray(rng.standard_normal(q.shape[:-1]), jnp.float32))


def test_ragged_calls_take_valid_extent_as_trailing_int32_operand(emulated):
    """Forward and backward custom calls of a ragged call get valid_extent as an int32 [B, rank]
    last operand (also from int64 input); a plain call gets exactly its old operands."""
    q, k, v, _ = _data(0, 3, (6, 5), 4, 2, 8)
    dout, d_lse = _cotangents(1, q)
    ext = np.array([[6, 5], [3, 4], [4, 5]], np.int64)
    for valid_extent, tail in ((None, []), (ext, [((3, 2), "int32")])):
        emulated.clear()
        p = _problem(q, k, v, ragged=valid_extent is not None)

        def f(q, k, v):
            return fused.run(p, q, k, v, valid_extent=valid_extent)

        (_, _), vjp = jax.vjp(jax.jit(f), q, k, v)
        vjp((dout, d_lse))
        fwd = [ops for t, ops in emulated if t == fused.TARGET]
        bwd = [ops for t, ops in emulated if t == fused.TARGET_BACKWARD]
        kd = fused.kernel_head_dim(8, 8)  # head dim 8 reaches the kernels zero-padded
        qs, ks = ((3, 6, 5, 4, kd), "float32"), ((3, 6, 5, 2, kd), "float32")
        assert fwd and all(ops == [qs, ks, ks] + tail for ops in fwd), fwd
        lse = ((3, 6, 5, 4), "float32")
        assert bwd and all(ops == [qs, ks, ks, qs, lse, lse] + tail for ops in bwd), bwd


def test_real_custom_calls_lowered_with_valid_extent_operand():
    """The real FFI calls (lowered for the CPU, never run): a ragged forward and backward end in
    an i32 [B, rank] operand, folded to [V * B, rank] under vmap; without valid_extent the calls
    have their old operands."""
    q, k, v, _ = _data(2, 2, (6, 5), 2, 2, 32, dtype=jnp.float16)
    ext = jnp.asarray([[6, 5], [4, 4]], jnp.int32)

    def calls(valid_extent, vmapped=False):
        p = _problem(q, k, v, ragged=valid_extent is not None)

        def loss(q, k, v, ve):
            out, lse = fused.run(p, q, k, v, valid_extent=ve)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

        g = jax.grad(loss, (0, 1, 2))
        args = (q, k, v, valid_extent)
        if vmapped:
            g = jax.vmap(g, in_axes=(0, 0, 0, None if valid_extent is None else 0))
            args = tuple(None if x is None else jnp.stack([x, x, x]) for x in args)
        with jax.default_device(CPU), pytest.MonkeyPatch.context() as m:
            m.setattr(fused, "can_run", lambda p: (True, ""))
            txt = jax.jit(g).lower(*args).as_text()
        found = {}
        for line in txt.splitlines():
            if "stablehlo.custom_call @natten_jax_fna_" in line:
                target = line.split("@")[1].split("(")[0]
                found[target] = line.split(" : (")[1].split(") ->")[0]
        return found

    plain = calls(None)
    assert plain["natten_jax_fna_forward"].count("tensor<") == 3, plain
    assert plain["natten_jax_fna_backward"].count("tensor<") == 6, plain
    assert "i32" not in "".join(plain.values()), plain
    ragged = calls(ext)
    for target, n in (("natten_jax_fna_forward", 4), ("natten_jax_fna_backward", 7)):
        types = ragged[target].split(", ")
        assert len(types) == n and types[-1] == "tensor<2x2xi32>", ragged
    folded = calls(ext, vmapped=True)
    for target in ("natten_jax_fna_forward", "natten_jax_fna_backward"):
        assert folded[target].split(", ")[0].startswith("tensor<6x6x5x"), folded
        assert folded[target].split(", ")[-1] == "tensor<6x2xi32>", folded


@pytest.mark.parametrize("backward", ["kernel", "reference"])
def test_ragged_extra_tokens_match_crop_oracle(emulated, backward):
    """valid_extent with additional_lengths (one sample without extra tokens), NaN in every
    padded token and padded extra token: out / lse equal crop_oracle's, padded outputs and
    gradients exactly 0, nothing NaN; gradients (with random cotangents) equal crop_oracle's."""
    q, k, v, (ek, ev) = _data(3, 4, (7, 6), 4, 2, 8, N=3)
    ext = np.array([[7, 6], [3, 4], [5, 6], [6, 4]], np.int32)
    lens = np.array([3, 0, 2, 1], np.int32)
    pad = lambda x: ragged_oracle.poison_padding(x, ext)  # noqa: E731
    used = (np.arange(3)[None, :] < lens[:, None])[:, :, None, None]
    xpad = lambda x: jnp.where(used, x, jnp.nan)  # noqa: E731
    args = (pad(q), pad(k), pad(v), xpad(ek), xpad(ev))
    cfg = dataclasses.replace(NOTUNE, backward=backward)
    p = _problem(q, k, v, ek, ev, ragged_extra=True, config=cfg)
    (out, lse), vjp = jax.vjp(jax.jit(_fused(p, ext, lens)), *args)
    (out64, lse64), vjp64 = jax.vjp(_oracle(ext, lens), q, k, v, ek, ev)
    _close(out, out64, name="out")
    _close(lse, lse64, name="lse")
    mask = ragged_oracle.valid_mask(q.shape[1:3], ext)
    assert (np.asarray(out)[~mask] == 0).all() and (np.asarray(lse)[~mask] == 0).all()
    dout, d_lse = _cotangents(4, q)
    grads = vjp((dout, d_lse))
    grads64 = vjp64((dout.astype(jnp.float64), d_lse.astype(jnp.float64)))
    for name, g, g64 in zip(("dq", "dk", "dv", "d_extra_k", "d_extra_v"), grads, grads64):
        _close(g, g64, tol=1e-4, name=name)
    for g in grads[:3]:
        assert (np.asarray(g)[~mask] == 0).all()
    for g in grads[3:]:
        assert (np.asarray(g)[~np.broadcast_to(used, g.shape)] == 0).all()


def test_sample_without_extra_tokens_is_the_neighborhood_result(emulated):
    """additional_lengths 0: exactly (bitwise) the call without extra tokens, with finite
    gradients, which equal those of the plain call; a full length is the plain extra merge."""
    q, k, v, (ek, ev) = _data(5, 2, (9,), 2, 2, 8, N=4)
    na = dict(kernel_size=3, dilation=2)
    p = _problem(q, k, v, ek, ev, ragged=False, ragged_extra=True, **na)
    p_plain = _problem(q, k, v, ragged=False, **na)
    lens = jnp.asarray([0, 0], jnp.int32)
    f = jax.jit(lambda q, k, v, ek, ev: fused.run(p, q, k, v, ek, ev, additional_lengths=lens))
    plain = jax.jit(lambda q, k, v: fused.run(p_plain, q, k, v))
    (out, lse), vjp = jax.vjp(f, q, k, v, ek, ev)
    (out0, lse0), vjp0 = jax.vjp(plain, q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out0))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse0))
    cts = _cotangents(6, q)
    grads, grads0 = vjp(cts), vjp0(cts)
    for g, g0 in zip(grads[:3], grads0):
        _close(g, g0, tol=1e-6)
    assert all((np.asarray(g) == 0).all() for g in grads[3:])
    full = jax.jit(lambda q, k, v, ek, ev: fused.run(
        p, q, k, v, ek, ev, additional_lengths=jnp.asarray([4, 9], jnp.int32)))  # 9: clamped
    p_extra = _problem(q, k, v, ek, ev, ragged=False, **na)
    want = jax.jit(lambda *a: fused.run(p_extra, *a))(q, k, v, ek, ev)
    for g, w in zip(full(q, k, v, ek, ev), want):
        _close(g, w, tol=1e-6)


def test_vmap_folds_valid_extent_into_batch(emulated):
    """vmap over a leading axis (extents mapped, or shared by every slice): one forward call on
    the folded batch with [V * B, rank] extents, each slice equal to its crop_oracle."""
    q, k, v, (ek, ev) = _data(7, 6, (8,), 2, 1, 8, N=2)
    split = lambda x: x.reshape((3, 2) + x.shape[1:])  # noqa: E731
    ext = np.array([[8], [3], [5], [8], [4], [6]], np.int32)
    lens = np.array([2, 0, 1, 2, 2, 1], np.int32)
    na = dict(kernel_size=3, is_causal=True)
    p = _problem(q[:2], k[:2], v[:2], ek[:2], ev[:2], ragged_extra=True, **na)

    def f(q, k, v, ek, ev, ve, n):
        return fused.run(p, q, k, v, ek, ev, valid_extent=ve, additional_lengths=n)

    out, lse = jax.jit(jax.vmap(f))(*map(split, (q, k, v, ek, ev)), split(jnp.asarray(ext)),
                                    split(jnp.asarray(lens)))
    fwd = [ops for t, ops in emulated if t == fused.TARGET]
    assert fwd[-1][-1] == ((6, 1), "int32"), fwd
    out64, lse64 = _oracle(ext, lens, na)(q, k, v, ek, ev)
    _close(out.reshape(out64.shape), out64, name="out")
    _close(lse.reshape(lse64.shape), lse64, name="lse")
    # one extent table for every slice: broadcast, then folded
    emulated.clear()
    out, _ = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, 0, 0, None, None)))(
        *map(split, (q, k, v, ek, ev)), jnp.asarray(ext[:2]), jnp.asarray(lens[:2]))
    assert [ops for t, ops in emulated if t == fused.TARGET][-1][-1] == ((6, 1), "int32")
    want, _ = _oracle(np.tile(ext[:2], (3, 1)), np.tile(lens[:2], 3), na)(q, k, v, ek, ev)
    _close(out.reshape(want.shape), want, name="out (shared extents)")


def test_public_call_with_new_extents_does_not_retrace(emulated):
    """na2d(..., backend="fused", valid_extent=...) under jit: new extent values and lengths
    reuse the compiled call (one trace of the custom call), each result equal to crop_oracle."""
    import natten_jax

    q, k, v, (ek, ev) = _data(10, 3, (6, 7), 2, 2, 8, N=2)
    f = jax.jit(lambda q, k, v, ek, ev, ve, n: natten_jax.na2d(
        q, k, v, 3, additional_keys=ek, additional_values=ev, valid_extent=ve,
        additional_lengths=n, backend="fused", backend_config=NOTUNE, return_lse=True))
    for ext, lens in (([[6, 7], [3, 3], [4, 6]], [2, 0, 1]), ([[5, 3], [6, 7], [3, 5]], [0, 2, 2])):
        ext, lens = np.asarray(ext, np.int32), np.asarray(lens, np.int32)
        out, lse = f(q, k, v, ek, ev, ext, lens)
        out64, lse64 = _oracle(ext, lens, dict(kernel_size=3))(q, k, v, ek, ev)
        _close(out, out64, name="out")
        _close(lse, lse64, name="lse")
    assert len([t for t, _ in emulated if t == fused.TARGET]) == 1, emulated


# ---------------------------------------------------------------------------------------------
# GPU: the ragged kernels against crop_oracle, per element

SM80 = FusedConfig(forward_impl="sm80", backward_impl="sm80", backward="kernel")
SM90 = FusedConfig(forward_impl="sm90", backward_impl="sm90", backward="kernel")

# (spatial, kernel, stride, dilation, causal, heads, kv heads, head dim, dtype, impl, extra N):
# ranks 1-3, stride, dilation with uneven groups (extents not multiples of it), causal per axis,
# GQA and MQA, head dims 32 / 64 / 128, fp16 and bf16, sm90 at 64 / 128, extra tokens.
GPU_CASES = [
    ((70,), 7, 2, 3, True, 4, 2, 32, "float16", "sm80", 0),
    ((19, 23), (5, 3), (1, 2), (2, 1), (False, True), 4, 1, 64, "bfloat16", "sm80", 0),
    ((19, 23), (5, 3), (1, 2), (2, 1), (False, True), 4, 1, 64, "bfloat16", "sm90", 0),
    ((6, 9, 11), (3, 3, 5), (1, 2, 1), (2, 1, 2), (True, False, False), 2, 2, 128, "float16",
     "sm90", 0),
    ((6, 9, 11), (3, 3, 5), (1, 2, 1), (2, 1, 2), (True, False, False), 2, 2, 128, "bfloat16",
     "sm80", 0),
    ((16, 20), 5, 1, 1, False, 4, 2, 64, "bfloat16", "sm80", 5),
    ((16, 20), 5, 1, 1, False, 4, 2, 64, "float16", "sm90", 5),
    # samples smaller than one query tile on an axis, next to a sample spanning many tiles
    ((300,), 9, 1, 1, False, 2, 1, 64, "bfloat16", "sm80", 0),
    ((40, 48), 3, 1, 1, (True, False), 2, 2, 128, "float16", "sm90", 0),
]
B_GPU = 4


def _sm90_ready():
    from natten_jax import autotune

    if not _ffi.cuda_kernels_available():
        return False, _ffi.unavailable_reason()
    if not autotune.sm90_runs():
        return False, "the sm90 kernels cannot run here (compute capability 9.0, sm_90a code)"
    return True, ""


def _gpu_extents(rng, spatial, kernel, dilation, tiny):
    """[B_GPU, rank]: a full sample, a minimal one (kernel * dilation on every axis), random
    ones; ``tiny``: samples of a few tokens on one axis (below any query tile)."""
    rank = len(spatial)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    di = dilation if isinstance(dilation, tuple) else (dilation,) * rank
    lo = np.asarray(ks) * np.asarray(di)
    ext = ragged_oracle.random_extents(rng, B_GPU, spatial, ks, di)
    ext[1] = lo
    if tiny:
        ext[2] = spatial
        ext[2, 0] = lo[0] + 1
        ext[3, -1] = lo[-1] + 2
    return ext.astype(np.int32)


def _gpu_inputs(seed, spatial, H, Hkv, D, dtype, N, ext, lens):
    """Random q, k, v (and extra tokens) in ``dtype`` with NaN in every padded token (and every
    extra token past a sample's length); cotangents dout (``dtype``) and d_lse (float32)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    r = lambda key, *s: jax.random.normal(key, s, jnp.float32).astype(dtype)  # noqa: E731
    q = ragged_oracle.poison_padding(r(keys[0], B_GPU, *spatial, H, D), ext)
    k = ragged_oracle.poison_padding(r(keys[1], B_GPU, *spatial, Hkv, D), ext)
    v = ragged_oracle.poison_padding(r(keys[2], B_GPU, *spatial, Hkv, D), ext)
    ek = ev = None
    if N:
        used = jnp.asarray(np.arange(N)[None, :] < lens[:, None])[:, :, None, None]
        ek = jnp.where(used, r(keys[3], B_GPU, N, Hkv, D), jnp.nan)
        ev = jnp.where(used, r(keys[4], B_GPU, N, Hkv, D), jnp.nan)
    dout = r(keys[5], B_GPU, *spatial, H, D)
    d_lse = jax.random.normal(keys[6], (B_GPU, *spatial, H), jnp.float32)
    return (q, k, v, ek, ev), (dout, d_lse)


def _fused_step(rank, na, config, traces):
    """jit: (q, k, v, ek, ev, valid_extent, lengths, dout, d_lse) -> (out, lse, grads); appends
    to ``traces`` each time it is traced."""
    import natten_jax

    f = getattr(natten_jax, f"na{rank}d")

    def step(q, k, v, ek, ev, ext, lens, dout, d_lse):
        traces.append(1)
        def call(q, k, v, ek, ev):
            return f(q, k, v, **na, additional_keys=ek, additional_values=ev, valid_extent=ext,
                     additional_lengths=lens, backend="fused", backend_config=config,
                     return_lse=True)
        (out, lse), vjp = jax.vjp(call, q, k, v, ek, ev)
        return out, lse, vjp((dout, d_lse))

    return jax.jit(step)


def _oracle_step(rank, na, args, ext, lens, cts):
    """crop_oracle in float64 on the CPU: (out, lse) and the gradients for the cotangents."""
    with jax.default_device(CPU):
        host = [None if x is None else np.asarray(x.astype(jnp.float64)) for x in args]
        n = 5 if host[3] is not None else 3
        fn = _oracle(ext, lens, na)
        (out, lse), vjp = jax.vjp(fn, *host[:n])
        grads = vjp(tuple(np.asarray(c.astype(jnp.float64)) for c in cts))
        return (np.asarray(out), np.asarray(lse)), tuple(np.asarray(g) for g in grads)


def _check_ragged_gpu(out, lse, grads, ref, ext, lens, N, name):
    """Per element against crop_oracle (the float64 result rounded to the inputs' precision as
    the low-precision reference: the reference backend computes in float32 and rounds its
    results, which float64 rounded reproduces up to float32 arithmetic), padded outputs and
    gradients exactly 0, nothing NaN."""
    from test_fused import LSE_ATOL
    from test_fused_backward import GRAD_ATOL_FACTOR

    (out64, lse64), grads64 = ref
    lowp = np.dtype(out.dtype)
    oracle.assert_close_to_ref64(np.asarray(out.astype(jnp.float32)), out64,
                                 out64.astype(lowp), name=f"{name}: out")
    oracle.assert_close_to_ref64(np.asarray(lse), lse64, lse64.astype(np.float32),
                                 atol=LSE_ATOL, name=f"{name}: lse")
    mask = ragged_oracle.valid_mask(out.shape[1:-2], ext)
    assert (np.asarray(out.astype(jnp.float32))[~mask] == 0).all(), f"{name}: padded out"
    assert (np.asarray(lse)[~mask] == 0).all(), f"{name}: padded lse"
    names = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")
    for gname, g, g64 in zip(names, grads, grads64):
        g = np.asarray(g.astype(jnp.float32), np.float64)
        atol = GRAD_ATOL_FACTOR * oracle.rounding_atol(g64, lowp)
        oracle.assert_close_to_ref64(g, g64, g64.astype(lowp), atol=atol, name=f"{name}: {gname}")
        pad = ~mask if gname in ("dq", "dk", "dv") else ~(np.arange(N)[None, :] < lens[:, None])
        assert (g[pad] == 0).all(), f"{name}: {gname} nonzero at padding"


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_ragged_kernels_match_crop_oracle(case):
    """Forward (out, lse) and backward (dq, dk, dv, extra-token gradients) of the ragged kernels
    with NaN padding, against crop_oracle per element; then the same compiled call with new
    extents (and lengths) gives their result without recompiling."""
    spatial, kernel, stride, dilation, causal, H, Hkv, D, dtype, impl, N = GPU_CASES[case]
    if impl == "sm90":
        ok, why = _sm90_ready()
        if not ok:
            pytest.skip(why)
    rank = len(spatial)
    na = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    config = SM90 if impl == "sm90" else SM80
    rng = np.random.default_rng(case)
    tiny = case >= 7
    traces = []
    step = _fused_step(rank, na, config, traces)
    for rep in range(2 if case in (1, 5) else 1):  # second round: new extents, same executable
        ext = _gpu_extents(rng, spatial, kernel, dilation, tiny)
        lens = np.array([N, 0, N // 2, 1], np.int32)[:B_GPU] if N else None
        if rep:
            ext, lens = ext[::-1].copy(), None if lens is None else lens[::-1].copy()
        args, cts = _gpu_inputs(100 * case + rep, spatial, H, Hkv, D, dtype, N, ext, lens)
        jargs = args + (jnp.asarray(ext), None if lens is None else jnp.asarray(lens)) + cts
        if rep == 0:
            txt = step.lower(*jargs).as_text()
            calls = [ln for ln in txt.splitlines() if "stablehlo.custom_call @natten_jax_fna" in ln]
            assert len(calls) == 2 and all("xi32>" in ln for ln in calls), calls
        out, lse, grads = step(*jargs)
        ref = _oracle_step(rank, na, args, ext, lens, cts)
        _check_ragged_gpu(out, lse, grads, ref, ext, lens, N, f"case {case} round {rep}")
    assert len(traces) == 1, "new extent values retraced the call"


@pytest.mark.gpu
def test_ragged_kernels_under_vmap():
    """vmap over a leading axis (extents mapped): each slice equals the unmapped call on it,
    bitwise (the slices are folded into the kernels' batch)."""
    import natten_jax

    # every extent at least kernel * dilation = (5, 14): concrete values below it are refused,
    # traced ones clamped (reading the padding, which is NaN here)
    spatial, ext = (18, 21), np.array([[18, 21], [5, 14], [12, 16], [7, 21]], np.int32)
    args, _ = _gpu_inputs(7, spatial, 4, 2, 64, "bfloat16", 0, ext, None)
    q, k, v = args[:3]
    split = lambda x: x.reshape((2, 2) + x.shape[1:])  # noqa: E731

    def na(q, k, v, e):
        return natten_jax.na2d(q, k, v, (5, 7), dilation=(1, 2), valid_extent=e,
                               backend="fused", backend_config=SM80, return_lse=True)

    outs, lses = jax.jit(jax.vmap(na))(*map(split, (q, k, v, jnp.asarray(ext))))
    for i in range(2):
        out, lse = jax.jit(na)(*(split(x)[i] for x in (q, k, v, jnp.asarray(ext))))
        np.testing.assert_array_equal(np.asarray(outs[i]), np.asarray(out))
        np.testing.assert_array_equal(np.asarray(lses[i]), np.asarray(lse))
        assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
