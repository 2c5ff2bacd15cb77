"""The fused backend's configuration as a value (natten_jax.config; CPU, no kernel needed)."""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natten_jax
from natten_jax import autotune, config
from natten_jax.backends import fused
from natten_jax.checks import check_na_call
from natten_jax.config import ENV_VARS, FusedConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_default(monkeypatch):
    """Every test starts from an environment without the variables and no cached default."""
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    config.reset_default_config()
    yield
    config.reset_default_config()


def _problem(cfg=None, head_dim=64):
    s = jax.ShapeDtypeStruct((2, 24, 40, 4, head_dim), jnp.bfloat16)
    return check_na_call(2, s, s, s, 7, 1, 1, False, None, backend_config=cfg)


# ---------------------------------------------------------------------------------------------
# The value


def test_defaults_and_export():
    assert natten_jax.FusedConfig is FusedConfig
    c = FusedConfig()
    assert (c.forward_impl, c.backward_impl, c.backward, c.autotune) == \
        ("auto", "auto", "kernel", "off")
    assert (c.q_tile, c.sm80_occupancy, c.cache_dir) == (None, None, None)
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(FusedConfig)}


def test_hashable_value_and_replace():
    a = FusedConfig(forward_impl="sm80", q_tile=64)
    assert a == FusedConfig(forward_impl="sm80", q_tile=64)
    assert hash(a) == hash(FusedConfig(forward_impl="sm80", q_tile=64))
    b = a.replace(q_tile=128)
    assert b.q_tile == 128 and b.forward_impl == "sm80" and a.q_tile == 64 and a != b
    with pytest.raises(ValueError, match="q_tile"):
        a.replace(q_tile=96)
    with pytest.raises(AttributeError):
        a.q_tile = 128  # frozen
    n = FusedConfig(q_tile=np.int64(128), sm80_occupancy=np.int32(5))
    assert type(n.q_tile) is int and type(n.sm80_occupancy) is int
    assert n == FusedConfig(q_tile=128, sm80_occupancy=5)
    assert FusedConfig(cache_dir=pathlib.Path("/tmp/x")).cache_dir == "/tmp/x"


@pytest.mark.parametrize("field, value", [
    ("forward_impl", "sm100"), ("forward_impl", "SM90"), ("forward_impl", None),
    ("backward_impl", "fast"), ("backward", "kernels"), ("backward", 1),
    ("autotune", "always"), ("autotune", True),
    ("q_tile", 96), ("q_tile", "64"), ("q_tile", True), ("q_tile", 64.0),
    ("sm80_occupancy", 3), ("sm80_occupancy", 7), ("sm80_occupancy", "5"),
    ("cache_dir", ""), ("cache_dir", "  "), ("cache_dir", 3),
])
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`") as e:
        FusedConfig(**{field: value})
    assert repr(value) in str(e.value)


def test_backend_config_must_be_a_fused_config():
    s = jax.ShapeDtypeStruct((1, 8, 2, 32), jnp.float32)
    for bad in ({"forward_impl": "sm80"}, "sm80", 1):
        with pytest.raises(TypeError, match="backend_config"):
            check_na_call(1, s, s, s, 3, 1, 1, False, None, backend_config=bad)
        with pytest.raises(TypeError, match="backend_config"):
            natten_jax.na1d(jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)),
                            jnp.zeros((1, 8, 2, 32)), 3, backend_config=bad)


# ---------------------------------------------------------------------------------------------
# Environment variables: defaults only, read once


def test_env_sets_defaults_read_once(monkeypatch):
    monkeypatch.setenv("NATTEN_JAX_FNA_IMPL", " SM90 ")
    monkeypatch.setenv("NATTEN_JAX_FNA_BWD_IMPL", "sm80")
    monkeypatch.setenv("NATTEN_JAX_FUSED_BACKWARD", "Reference")
    monkeypatch.setenv("NATTEN_JAX_AUTOTUNE", "thorough")
    monkeypatch.setenv("NATTEN_JAX_FNA_Q_TILE", "128")
    monkeypatch.setenv("NATTEN_JAX_FNA_SM80_OCC", "6")
    monkeypatch.setenv("NATTEN_JAX_CACHE_DIR", " /tmp/Some Dir ")
    want = FusedConfig(forward_impl="sm90", backward_impl="sm80", backward="reference",
                       autotune="thorough", q_tile=128, sm80_occupancy=6,
                       cache_dir="/tmp/Some Dir")
    assert config.default_config() == want
    assert _problem().config == want  # backend_config=None is the default config
    monkeypatch.setenv("NATTEN_JAX_FNA_IMPL", "sm80")  # read once: no effect now
    assert config.default_config() is config.default_config() == want
    assert _problem().config.forward_impl == "sm90"
    config.reset_default_config()
    assert config.default_config().forward_impl == "sm80"
    # an explicit config is what it says, whatever the environment
    assert _problem(FusedConfig()).config == FusedConfig()


def test_empty_env_is_unset(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.setenv(var, "  ")
    assert config.default_config() == FusedConfig()
    assert config.config_from_env({}) == FusedConfig()


@pytest.mark.parametrize("field, raw", [
    ("forward_impl", "sm100"), ("backward_impl", "fast"), ("backward", "none"),
    ("autotune", "1"), ("q_tile", "96"), ("q_tile", "sixty-four"), ("sm80_occupancy", "8"),
])
def test_invalid_env_value_names_the_variable(monkeypatch, field, raw):
    var = ENV_VARS[field]
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=var) as e:
        config.default_config()
    assert repr(raw) in str(e.value)
    with pytest.raises(ValueError, match=var):
        config.config_from_env({var: raw})


def test_only_the_config_module_reads_the_environment():
    pattern = re.compile(r"os\.environ|getenv")
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "natten_jax").rglob("*.py")
                     if pattern.search(p.read_text()))
    assert readers == [os.path.join("natten_jax", "config.py")]


# ---------------------------------------------------------------------------------------------
# The config in the static problem and the custom calls' attributes


def test_configs_give_different_problems():
    a, b = _problem(FusedConfig()), _problem(FusedConfig(forward_impl="sm80"))
    assert a != b and hash(a) != hash(b)
    assert a == _problem(FusedConfig()) and hash(a) == hash(_problem(FusedConfig()))
    # the problem is hashed by jit as a static argument: a different config is another trace
    traces = []
    g = jax.jit(lambda x, p: traces.append(p) or x, static_argnums=1)
    for p in (a, b, a, b):
        g(jnp.float32(0), p)
    assert traces == [a, b]


def test_forward_attrs_follow_the_config():
    base = fused._attrs(_problem(FusedConfig(forward_impl="sm80")))
    assert base["impl"] == 0 and base["sm80_occupancy"] == 0
    assert base["sm80_occupancy"].dtype == np.int64
    sm90 = fused._attrs(_problem(FusedConfig(forward_impl="sm90")))
    assert sm90["impl"] == 1
    occ = fused._attrs(_problem(FusedConfig(forward_impl="sm80", sm80_occupancy=5)))
    assert occ["sm80_occupancy"] == 5 and occ["impl"] == 0
    # the same tiles and window attributes otherwise
    assert {k for k in base if not np.array_equal(base[k], occ[k])} == {"sm80_occupancy"}
    q64 = fused._attrs(_problem(FusedConfig(forward_impl="sm80", q_tile=64)))
    q128 = fused._attrs(_problem(FusedConfig(forward_impl="sm80", q_tile=128)))
    assert int(np.sum(q64["q_tile"])) == 6 and int(np.sum(q128["q_tile"])) == 7
    # sm90 at a head dim it lacks runs sm80
    assert fused._attrs(_problem(FusedConfig(forward_impl="sm90"), head_dim=32))["impl"] == 0


def test_backward_attrs_follow_the_config():
    p80 = _problem(FusedConfig(backward_impl="sm80", forward_impl="sm90"))
    p90 = _problem(FusedConfig(backward_impl="sm90", forward_impl="sm80", q_tile=128,
                               sm80_occupancy=6))
    a, b = fused._attrs(p80, backward=True), fused._attrs(p90, backward=True)
    assert a["impl"] == 0 and b["impl"] == 1
    assert set(a) == set(b) == {"kernel_size", "stride", "dilation", "is_causal", "q_tile",
                                "kv_tile", "scale", "poison", "impl", "precision"}
    assert int(np.sum(b["q_tile"])) == 6  # the backward's Q tile is always 64 tokens


def test_lowered_call_keeps_the_config_it_was_traced_with(monkeypatch):
    """A function traced with the default config keeps that config's kernel when the default
    changes later; a new trace sees the new default, an explicit config is unaffected."""
    s = jax.ShapeDtypeStruct((1, 24, 40, 4, 64), jnp.float16)

    def fwd(q, k, v, cfg=None):
        p = check_na_call(2, q, k, v, 7, 1, 1, False, None, backend_config=cfg)
        return fused._forward_call(p, q, k, v)

    def impl_of(text):
        return re.findall(r"impl = (\d+)", text)

    monkeypatch.setenv("NATTEN_JAX_FNA_IMPL", "sm80")
    f = jax.jit(fwd)
    explicit = jax.jit(lambda q, k, v: fwd(q, k, v, FusedConfig(forward_impl="sm90",
                                                                sm80_occupancy=6)))
    before = f.lower(s, s, s).as_text()
    assert impl_of(before) == ["0"] and "sm80_occupancy = 0 : i64" in before
    text = explicit.lower(s, s, s).as_text()
    assert impl_of(text) == ["1"] and "sm80_occupancy = 6 : i64" in text
    monkeypatch.setenv("NATTEN_JAX_FNA_IMPL", "sm90")
    config.reset_default_config()
    assert f.lower(s, s, s).as_text() == before  # cached trace: the config it was traced with
    retraced = jax.jit(lambda q, k, v: fwd(q, k, v))  # a new function: a new trace
    assert impl_of(retraced.lower(s, s, s).as_text()) == ["1"]
    assert impl_of(explicit.lower(s, s, s).as_text()) == ["1"]


# ---------------------------------------------------------------------------------------------
# Auto-tuner keys and the import graph


def test_autotune_keys_differ_across_configs():
    def key(cfg, backward=False):
        return autotune.problem_key(_problem(cfg), backward, device="H100")

    base = FusedConfig(forward_impl="sm80", backward_impl="sm80")
    forward = {key(base), key(base.replace(forward_impl="sm90")), key(base.replace(q_tile=64)),
               key(base.replace(q_tile=128)), key(base.replace(sm80_occupancy=5)),
               key(base.replace(sm80_occupancy=6))}
    assert len(forward) == 6
    assert "impl=sm80" in key(base).split("|") and "impl=sm90" in \
        key(base.replace(forward_impl="sm90")).split("|")
    assert "sm80_occupancy=5" in key(base.replace(sm80_occupancy=5)).split("|")
    # the sm90 forward and the backward kernels do not use the occupancy; the backward no Q tile
    sm90 = base.replace(forward_impl="sm90")
    assert key(sm90) == key(sm90.replace(sm80_occupancy=5))
    assert key(base, True) == key(base.replace(q_tile=128, sm80_occupancy=6, forward_impl="sm90"),
                                  True)
    assert key(base, True) != key(base.replace(backward_impl="sm90"), True)
    # what does not change the kernel does not change the key
    assert key(base) == key(base.replace(autotune="on", cache_dir="/elsewhere",
                                         backward="reference"))


def test_cache_dir_comes_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("NATTEN_JAX_CACHE_DIR", str(tmp_path / "env"))
    assert autotune.cache_dir() == str(tmp_path / "env")
    assert autotune.cache_dir(FusedConfig(cache_dir=str(tmp_path / "cfg"))) == \
        str(tmp_path / "cfg")
    assert autotune.cache_dir(FusedConfig()) == os.path.expanduser("~/.cache/natten_jax")


def test_autotune_does_not_import_the_fused_backend():
    """natten_jax.autotune imports neither natten_jax.backends.fused nor any backend (the
    package __init__ is bypassed: it imports the backends for na1d/na2d/na3d)."""
    code = f"""
import sys, types
pkg = types.ModuleType("natten_jax")
pkg.__path__ = [{str(ROOT / "natten_jax")!r}]
sys.modules["natten_jax"] = pkg
import natten_jax.autotune
loaded = sorted(m for m in sys.modules if m.startswith("natten_jax"))
assert "natten_jax.autotune" in loaded, loaded
assert not any(m.startswith("natten_jax.backends") for m in loaded), loaded
print(" ".join(loaded))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    assert "natten_jax.config" in r.stdout.split()
    src = (ROOT / "natten_jax" / "autotune.py").read_text()  # not even lazily, in a function
    assert not re.search(r"^\s*(import|from)\s+natten_jax\.backends|"
                         r"^\s*from\s+natten_jax\s+import\s+.*\bbackends\b", src, re.M)
