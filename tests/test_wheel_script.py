"""scripts/build_wheel.sh (as a pure-Python wheel: NATTEN_JAX_CUDA=OFF, no build isolation, so
no network and no nvcc) and scripts/pytest_shards.sh, which scripts/gpu_wheel_check.sh runs.

The CUDA wheel itself is built and tested on the GPU machine: bash scripts/gpu_wheel_check.sh.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_WHEEL = os.path.join(REPO, "scripts", "build_wheel.sh")
PYTEST_SHARDS = os.path.join(REPO, "scripts", "pytest_shards.sh")


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("scikit_build_core") is None
                    or importlib.util.find_spec("nanobind") is None,
                    reason="building needs scikit-build-core and nanobind")
def test_build_wheel_pure(tmp_path):
    r = _run(["bash", BUILD_WHEEL, "--no-build-isolation"], PYTHON=sys.executable,
             NATTEN_JAX_CUDA="OFF", DIST=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = r.stdout.strip().splitlines()[-1]  # the last line: the wheel's path
    assert os.path.dirname(wheel) == str(tmp_path) and os.path.isfile(wheel)
    assert os.path.basename(wheel).startswith("natten_jax-")
    assert "== wheel check ok" in r.stdout
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("__init__", "functional", "config", "nnx", "linen", "models/__init__",
                   "models/nat", "backends/fused"):
        assert f"natten_jax/{module}.py" in names
    assert not [n for n in names if n.endswith(".so") or "__pycache__" in n]
    assert not [n for n in names if not n.startswith(("natten_jax/", "natten_jax-"))]


@pytest.mark.parametrize("args,env,message", [
    (["--bogus"], {}, "unknown argument '--bogus'"),
    ([], {"NATTEN_JAX_BUILD_ISOLATION": "maybe"}, "NATTEN_JAX_BUILD_ISOLATION must be 0 or 1"),
    ([], {"NATTEN_JAX_CUDA": "AUTO"}, "NATTEN_JAX_CUDA must be ON or OFF"),
])
def test_build_wheel_bad_arguments(args, env, message):
    r = _run(["bash", BUILD_WHEEL] + args, **env)
    assert r.returncode == 2 and message in r.stderr, r.stdout + r.stderr


def test_build_wheel_no_isolation_names_missing_packages(tmp_path):
    # An interpreter without the build dependencies: a venv without system site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = _run(["bash", BUILD_WHEEL, "--no-build-isolation"],
             PYTHON=str(venv / "bin" / "python"), DIST=str(tmp_path / "dist"))
    assert r.returncode != 0
    assert "lacks scikit-build-core, nanobind, jax, jaxlib, nvidia-cutlass" in r.stderr, r.stderr
    assert not (tmp_path / "dist").exists() or not os.listdir(tmp_path / "dist")


def test_pytest_shards(tmp_path):
    """Two shards split the tests (tests/conftest.py) and the counts add up over both."""
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path)
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(5))\n"
        "def test_ok(i):\n    assert i < 5\n"
        "@pytest.mark.skip(reason='skipped on purpose')\n"
        "def test_skipped():\n    pass\n")
    out = tmp_path / "out"

    def shards(*args):
        return subprocess.run(["bash", PYTEST_SHARDS, *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300,
                              env=dict(os.environ, PY=sys.executable, OUT=str(out),
                                       PYTEST_SHARDS="2", PYTHONPATH=""))

    r = shards("-p", "no:cacheprovider", "test_x.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "5 passed, 0 failed, 0 errors, 1 skipped"
    assert sorted(os.listdir(out)) == ["pytest.0.log", "pytest.0.xml", "pytest.1.log",
                                       "pytest.1.xml"]
    (tmp_path / "test_y.py").write_text("def test_fails():\n    assert False\n")
    r = shards("-p", "no:cacheprovider", "test_x.py", "test_y.py")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "5 passed, 1 failed, 0 errors, 1 skipped"
    assert "FAILED test_y.py::test_fails" in r.stdout
