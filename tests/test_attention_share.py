"""CPU tests of benchmarks/attention_share.py: the attention really leaves the models while
removed (and comes back), and a quick run times a real tiny model both ways."""

import math

import jax
import jax.numpy as jnp

import natten_jax
from benchmarks import attention_share as share
from benchmarks import model_throughput as mt


def _tiny_model_call():
    args = mt.parse_args(["--quick", "--backends", "reference", "--dtypes", "fp32"])
    model = mt.build_model("nat_mini", "reference", "float32", args)
    model.eval()
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 64, 3), jnp.float32)
    return lambda: model(x, deterministic=True)


def test_attention_removed_and_restored(monkeypatch):
    calls = []
    real = natten_jax.na2d

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(natten_jax, "na2d", spy)
    run = _tiny_model_call()
    with share.attention_removed():
        q = jnp.ones((1, 4, 4, 2, 8))
        v = jnp.full((1, 4, 4, 2, 8), 3.0)
        assert natten_jax.na2d(q, q, v, 3, dilation=1) is v
        run()
    assert calls == []  # the model looked na2d up at call time and got the replacement
    assert natten_jax.na2d is spy
    run()
    assert len(calls) > 0


def test_quick_run():
    rows = share.main(["--quick", "--backends", "reference", "--dtypes", "fp32", "--modes",
                       "infer"])
    (row,) = rows
    assert row["variant"] == "nat_mini" and row["backend"] == "reference"
    assert row["ms_with_attention"] > 0 and row["ms_without_attention"] > 0
    assert math.isclose(row["attention_share"],
                        1 - row["ms_without_attention"] / row["ms_with_attention"])


def test_backend_choice(monkeypatch):
    seen = []
    monkeypatch.setattr(mt, "measure", lambda variant, backend, *a: seen.append(backend) or
                        {"ms": 2.0})
    monkeypatch.setattr(mt, "make_batches", lambda *a: None)
    share.main(["--quick", "--dtypes", "fp32", "--modes", "infer"])  # every backend named
    share.main(["--quick", "--dtypes", "fp32", "--modes", "infer", "--backends",
                "reference,gemm,dense"])
    assert seen == ["fused", "fused", "gemm", "gemm"]
