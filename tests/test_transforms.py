"""jit / vmap / grad / checkpoint of the public API (reference backend) vs a dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
import oracle

NA = {1: natten_jax.na1d, 2: natten_jax.na2d, 3: natten_jax.na3d}
GRAD_TOL = 1e-9


def _rand(rng, shape, dtype=jnp.float64):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def make(seed, B, S, H, Hkv, D, Dv, N=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    q = _rand(rng, (B,) + S + (H, D), dtype)
    k = _rand(rng, (B,) + S + (Hkv, D), dtype)
    v = _rand(rng, (B,) + S + (Hkv, Dv), dtype)
    ek = _rand(rng, (B, N, Hkv, D), dtype) if N else None
    ev = _rand(rng, (B, N, Hkv, Dv), dtype) if N else None
    return q, k, v, ek, ev


def na_fn(rank, kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
    """(q, k, v, ek, ev) -> (out, lse) through the public API, reference backend."""
    def f(q, k, v, ek=None, ev=None):
        return NA[rank](q, k, v, kernel_size, stride, dilation, is_causal, scale,
                        additional_keys=ek, additional_values=ev, backend="reference",
                        return_lse=True)
    return f


def dense_fn(kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
    def f(q, k, v, ek=None, ev=None):
        return oracle.dense_masked_attention(q, k, v, kernel_size, stride, dilation, is_causal,
                                             scale, ek, ev)
    return f


def _close(a, b, tol, what=""):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = np.abs(a - b).max() if a.size else 0.0
    ref = max(np.abs(b).max() if b.size else 0.0, 1.0)
    assert err <= tol * ref, f"{what}: max abs err {err:.3e} > {tol} * {ref:.3e}"


# (rank, S, k, s, d, c, H, Hkv, D, Dv, N, scale)
GRAD_CASES = [
    (1, (9,), 3, 1, 1, False, 2, 2, 3, 3, 0, None),
    (1, (10,), 4, 3, 2, True, 4, 2, 3, 5, 2, 0.7),
    (1, (11,), 2, 2, 3, False, 3, 1, 4, 2, 1, None),
    (2, (5, 4), (3, 2), (2, 1), (1, 2), (False, True), 4, 1, 3, 3, 0, None),
    (2, (6, 5), (2, 3), (2, 3), (3, 1), (True, False), 2, 2, 2, 4, 3, -1.3),
    (3, (3, 4, 3), (2, 3, 3), (1, 2, 3), (1, 1, 1), (True, False, False), 2, 1, 3, 2, 2, None),
    (3, (4, 3, 5), (2, 2, 2), (2, 1, 2), (2, 1, 2), (False, True, True), 4, 2, 2, 3, 0, 0.5),
]
CASE_IDS = [f"r{c[0]}-{i}" for i, c in enumerate(GRAD_CASES)]


def _case(case, seed=0, B=2, dtype=jnp.float64):
    rank, S, k, s, d, c, H, Hkv, D, Dv, N, scale = case
    args = make(seed, B, S, H, Hkv, D, Dv, N, dtype)
    return rank, (k, s, d, c, scale), args


def _loss(f, cot_out, cot_lse):
    def loss(q, k, v, ek=None, ev=None):
        out, lse = f(q, k, v, ek, ev)
        return jnp.sum(out * cot_out) + jnp.sum(lse * cot_lse)
    return loss


def _cotangents(seed, args, dense_out):
    rng = np.random.default_rng(seed + 1000)
    out, lse = dense_out
    return _rand(rng, out.shape), _rand(rng, lse.shape)


# ------------------------------------------------------------------------------------------
# grad vs dense (float64).
# ------------------------------------------------------------------------------------------

def _vjp(fn, n):
    """jit-compiled (args, cotangents) -> input cotangents of fn restricted to its first n args."""
    @jax.jit
    def run(args, cots):
        _, pull = jax.vjp(lambda *a: fn(*a), *args[:n])
        return pull(cots)
    return run


@pytest.mark.parametrize("case", GRAD_CASES[1:], ids=CASE_IDS[1:])
def test_grad_all_inputs_vs_dense(case):
    """VJP w.r.t. q, k, v (and extra k/v) with cotangents on out+lse, out only, lse only."""
    rank, geo, args = _case(case)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    co, cl = _cotangents(0, args, jax.eval_shape(g, *args))
    n = 5 if args[3] is not None else 3
    got_fn, want_fn = _vjp(f, n), _vjp(g, n)
    names = ["dq", "dk", "dv", "d_extra_k", "d_extra_v"]
    for cots, what in (((co, cl), "out+lse"), ((co, jnp.zeros_like(cl)), "out-only"),
                       ((jnp.zeros_like(co), cl), "lse-only")):
        got = got_fn(args, cots)
        want = want_fn(args, cots)
        assert len(got) == n
        for name, a, b in zip(names, got, want):
            _close(a, b, GRAD_TOL, f"{what} {name} {case}")
        if what == "lse-only":
            # lse does not depend on v: its gradient w.r.t. v (and extra v) is exactly zero
            assert float(jnp.abs(got[2]).max()) == 0.0
            if n == 5:
                assert float(jnp.abs(got[4]).max()) == 0.0


@pytest.mark.parametrize("argnum,name,scale", [(0, "q", 0.25), (2, "v", -2.0)])
def test_grad_single_input(argnum, name, scale):
    case = (2, (5, 6), (3, 4), (1, 2), (1, 1), (False, True), 4, 2, 3, 2, 0, scale)
    rank, geo, args = _case(case, seed=5)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    co, cl = _cotangents(5, args, jax.eval_shape(g, *args))
    got = jax.jit(jax.grad(_loss(f, co, cl), argnums=argnum))(*args[:3])
    want = jax.jit(jax.grad(_loss(g, co, cl), argnums=argnum))(*args[:3])
    _close(got, want, GRAD_TOL, f"d{name} scale={scale}")


def test_scale_scales_query_gradient():
    """With logits scale*q.k, out(q, scale) == out(q * scale, 1)."""
    case = (1, (9,), 3, 1, 1, False, 2, 2, 4, 4, 0, None)
    rank, geo, args = _case(case, seed=6)
    q, k, v = args[:3]
    k_, s_, d_, c_, _ = geo
    f2 = na_fn(rank, k_, s_, d_, c_, 2.0)
    f1 = na_fn(rank, k_, s_, d_, c_, 1.0)
    l2 = lambda q: jnp.sum(f2(q, k, v)[0] ** 2)  # noqa: E731
    l1 = lambda q: jnp.sum(f1(2.0 * q, k, v)[0] ** 2)  # noqa: E731
    _close(jax.jit(jax.grad(l2))(q), jax.jit(jax.grad(l1))(q), 1e-12, "dq")


def test_gqa_grad_sums_over_group():
    """dK/dV of shared kv heads == sum of the per-query-head grads with K/V repeated."""
    rank, S, ks = 2, (5, 5), (3, 3)
    H, Hkv, D = 6, 2, 3
    G = H // Hkv
    q, k, v, _, _ = make(8, 2, S, H, Hkv, D, D)
    f = na_fn(rank, ks, 1, 1, False)
    co = _rand(np.random.default_rng(9), (2,) + S + (H, D))

    def loss_gqa(k, v):
        return jnp.sum(f(q, k, v)[0] * co)

    def loss_rep(kr, vr):  # MHA with K/V repeated explicitly
        return jnp.sum(f(q, kr, vr)[0] * co)

    dk, dv = jax.jit(jax.grad(loss_gqa, argnums=(0, 1)))(k, v)
    kr, vr = jnp.repeat(k, G, axis=-2), jnp.repeat(v, G, axis=-2)
    dkr, dvr = jax.jit(jax.grad(loss_rep, argnums=(0, 1)))(kr, vr)
    sh = dkr.shape[:-2] + (Hkv, G, D)
    _close(dk, dkr.reshape(sh).sum(-2), 1e-12, "dk")
    _close(dv, dvr.reshape(sh).sum(-2), 1e-12, "dv")
    # and the forward agrees with the repeated version
    fj = jax.jit(lambda q, k, v: f(q, k, v)[0])
    _close(fj(q, k, v), fj(q, kr, vr), 1e-13, "out")


@pytest.mark.parametrize("case", [GRAD_CASES[5]], ids=[CASE_IDS[5]])
def test_grad_blocked_rows_path(monkeypatch, case):
    """Gradients through the reference's row-blocked (lax.map) path."""
    from natten_jax import reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 1)
    rank, geo, args = _case(case, seed=10)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    co, cl = _cotangents(10, args, jax.eval_shape(g, *args))
    n = 5 if args[3] is not None else 3
    got = jax.jit(jax.grad(_loss(f, co, cl), argnums=tuple(range(n))))(*args[:n])
    want = jax.jit(jax.grad(_loss(g, co, cl), argnums=tuple(range(n))))(*args[:n])
    for i, (a, b) in enumerate(zip(got, want)):
        _close(a, b, GRAD_TOL, f"arg{i} {case}")


def test_reference_backward_keeps_no_gathered_windows(monkeypatch):
    """Under autodiff the reference recomputes each row block's gathered K/V windows, logits and
    probabilities instead of keeping them for the backward pass: the gradient's temporaries stay
    a fraction of one copy of the window-gathered keys (measured 0.15; kept, they were 2.2)."""
    from natten_jax import reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 1 << 16)  # 32 blocks of one query row
    B, L, H, D, k = 1, 32, 2, 32, 7
    x = jax.ShapeDtypeStruct((B, L, L, H, D), jnp.float32)

    def loss(q, kk, v):
        return natten_jax.na2d(q, kk, v, kernel_size=k, backend="reference").sum()

    exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    gathered = B * L * L * k * k * H * D * 4
    assert exe.memory_analysis().temp_size_in_bytes < 0.5 * gathered


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_grad_low_precision(dtype):
    """Gradients keep the input dtype and match the float64 dense grads."""
    case = GRAD_CASES[1]
    rank, geo, args = _case(case, seed=11, dtype=dtype)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    args64 = [a.astype(jnp.float64) for a in args]
    co, cl = _cotangents(11, args64, jax.eval_shape(g, *args64))
    got = jax.jit(jax.grad(_loss(f, co.astype(dtype), cl), argnums=(0, 1, 2, 3, 4)))(*args)
    want = jax.jit(jax.grad(_loss(g, co.astype(dtype).astype(jnp.float64), cl),
                            argnums=(0, 1, 2, 3, 4)))(*args64)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype, (i, a.dtype)
        _close(a.astype(jnp.float64), b, tol, f"arg{i} {dtype}")


# ------------------------------------------------------------------------------------------
# jit.
# ------------------------------------------------------------------------------------------

def test_jit_matches_eager_and_oracle():
    case = GRAD_CASES[1]
    rank, geo, args = _case(case, seed=12)
    f = na_fn(rank, *geo)
    eager = f(*args)
    jitted = jax.jit(f)(*args)
    want = oracle.na_oracle(*[np.asarray(a) for a in args[:3]], *geo, np.asarray(args[3]),
                            np.asarray(args[4]))
    for a, b, w in zip(eager, jitted, want):
        _close(a, b, 1e-13, "jit vs eager")
        _close(b, w, 1e-10, "jit vs oracle")


def test_jit_with_static_argnames():
    q, k, v, _, _ = make(13, 1, (6, 5), 2, 1, 4, 4)
    f = jax.jit(natten_jax.na2d, static_argnames=("kernel_size", "stride", "dilation",
                                                  "is_causal", "scale", "backend",
                                                  "return_lse"))
    out = f(q, k, v, kernel_size=(3, 2), stride=(2, 1), dilation=(2, 1), is_causal=(True, False),
            backend="reference")
    want, _ = oracle.na_oracle(np.asarray(q), np.asarray(k), np.asarray(v), (3, 2), (2, 1),
                               (2, 1), (True, False))
    _close(out, want, 1e-10, "out")
    out2, lse = f(q, k, v, kernel_size=(3, 2), stride=(2, 1), dilation=(2, 1),
                  is_causal=(True, False), backend="reference", return_lse=True)
    _close(out2, want, 1e-10, "out")
    assert lse.shape == (1, 6, 5, 2)


# ------------------------------------------------------------------------------------------
# vmap.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [GRAD_CASES[2], GRAD_CASES[6]], ids=[CASE_IDS[2], CASE_IDS[6]])
def test_vmap_leading_axis(case):
    rank, geo, _ = _case(case)
    f = na_fn(rank, *geo)
    V = 3
    stacked = [make(20 + i, 2, *_shape_args(case)) for i in range(V)]
    cols = list(zip(*stacked))
    batched = [jnp.stack(c) if c[0] is not None else None for c in cols]
    out, lse = jax.jit(jax.vmap(f))(*batched)
    fj = jax.jit(f)
    for i in range(V):
        o, l = fj(*stacked[i])
        _close(out[i], o, 1e-13, f"vmap out[{i}]")
        _close(lse[i], l, 1e-13, f"vmap lse[{i}]")


def _shape_args(case):
    rank, S, k, s, d, c, H, Hkv, D, Dv, N, scale = case
    return S, H, Hkv, D, Dv, N


def test_vmap_with_unbatched_kv_and_jit():
    """Only q batched (in_axes=(0, None, None, ...)), under jit."""
    case = GRAD_CASES[3]
    rank, geo, args = _case(case, seed=30)
    f = na_fn(rank, *geo)
    q, k, v = args[:3]
    qs = jnp.stack([q, 2 * q, -q])
    out, lse = jax.jit(jax.vmap(lambda q, k, v: f(q, k, v), in_axes=(0, None, None)))(qs, k, v)
    fj = jax.jit(f)
    for i in range(3):
        o, l = fj(qs[i], k, v)
        _close(out[i], o, 1e-13, f"out[{i}]")
        _close(lse[i], l, 1e-13, f"lse[{i}]")


def test_vmap_of_grad_per_example():
    case = GRAD_CASES[1]
    rank, geo, args = _case(case, seed=31, B=1)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    V = 2
    examples = [make(40 + i, 1, *_shape_args(case)) for i in range(V)]
    batched = [jnp.stack(c) for c in zip(*examples)]

    def loss_of(fn):
        return lambda q, k, v, ek, ev: jnp.sum(jnp.sin(fn(q, k, v, ek, ev)[0])) + jnp.sum(
            fn(q, k, v, ek, ev)[1])

    got = jax.jit(jax.vmap(jax.grad(loss_of(f), argnums=(0, 1, 2, 3, 4))))(*batched)
    dense_grad = jax.jit(jax.grad(loss_of(g), argnums=(0, 1, 2, 3, 4)))
    for i in range(V):
        want = dense_grad(*examples[i])
        for j, (a, b) in enumerate(zip(got, want)):
            _close(a[i], b, GRAD_TOL, f"example {i} arg{j}")


# ------------------------------------------------------------------------------------------
# checkpoint.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [GRAD_CASES[5]], ids=[CASE_IDS[5]])
def test_checkpoint(case):
    rank, geo, args = _case(case, seed=50)
    f, g = na_fn(rank, *geo), dense_fn(*geo)
    co, cl = _cotangents(50, args, jax.eval_shape(g, *args))

    def two_layers(fn):
        def h(q, k, v, ek, ev):
            out, lse = fn(q, k, v, ek, ev)
            # feed the output back as the query of a second call (needs D == Dv: crop/pad)
            q2 = jnp.tanh(out[..., : q.shape[-1]])
            q2 = jnp.concatenate([q2, q[..., q2.shape[-1]:]], -1)
            out2, lse2 = fn(q2, k, v, ek, ev)
            return out2, lse + lse2
        return h

    ck = jax.checkpoint(two_layers(f))
    dense = two_layers(g)
    argnums = (0, 1, 2, 3, 4)
    a = jax.jit(jax.grad(_loss(ck, co, cl), argnums=argnums))(*args)
    c = jax.jit(jax.grad(_loss(dense, co, cl), argnums=argnums))(*args)
    for i in range(5):
        _close(a[i], c[i], GRAD_TOL, f"checkpoint vs dense arg{i}")
    # remat policy variant, only the inner attention checkpointed
    f_ck = jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
    d = jax.jit(jax.grad(_loss(two_layers(f_ck), co, cl), argnums=argnums))(*args)
    for i in range(5):
        _close(d[i], c[i], GRAD_TOL, f"nothing_saveable arg{i}")


# ------------------------------------------------------------------------------------------
# return_lse.
# ------------------------------------------------------------------------------------------

def test_lse_value_and_grad_vs_dense_logsumexp():
    """lse == logsumexp over the neighborhood (explicit loop over queries), and its grad."""
    S, ks, st, dl, ca = (7,), 3, 2, 2, True
    q, k, v, ek, ev = make(60, 1, S, 2, 1, 3, 3, N=2)
    f = na_fn(1, ks, st, dl, ca, 0.9)
    mask = oracle.na_mask(S, ks, st, dl, ca)

    def lse_explicit(q, k, ek):
        rows = []
        for t in range(S[0]):
            idx = np.nonzero(mask[t])[0]
            logits = 0.9 * jnp.einsum("bhd,bnd->bhn", q[:, t], k[:, idx, 0])
            logits = jnp.concatenate([logits, 0.9 * jnp.einsum("bhd,bnd->bhn", q[:, t],
                                                               ek[:, :, 0])], -1)
            rows.append(jax.scipy.special.logsumexp(logits, axis=-1))
        return jnp.stack(rows, 1)

    _close(jax.jit(f)(q, k, v, ek, ev)[1], jax.jit(lse_explicit)(q, k, ek), 1e-12, "lse")
    got = jax.jit(jax.grad(lambda q, k, ek: jnp.sum(f(q, k, v, ek, ev)[1] ** 2),
                           argnums=(0, 1, 2)))(q, k, ek)
    want = jax.jit(jax.grad(lambda q, k, ek: jnp.sum(lse_explicit(q, k, ek) ** 2),
                            argnums=(0, 1, 2)))(q, k, ek)
    for i, (a, b) in enumerate(zip(got, want)):
        _close(a, b, GRAD_TOL, f"dlse arg{i}")
