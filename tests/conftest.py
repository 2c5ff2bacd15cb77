import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the compiled kernels")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def _shard():
    """``$NATTEN_JAX_TEST_SHARD`` = ``i/n``: this process runs every n-th test from the i-th
    (scripts/gpu_check.sh runs n pytest processes side by side on one GPU)."""
    raw = os.environ.get("NATTEN_JAX_TEST_SHARD", "").strip()
    if not raw:
        return None
    i, n = (int(x) for x in raw.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"NATTEN_JAX_TEST_SHARD must be i/n with 0 <= i < n, got {raw!r}")
    return i, n


def pytest_collection_modifyitems(config, items):
    shard = _shard()
    if shard is not None:
        i, n = shard
        keep = [it for k, it in enumerate(items) if k % n == i]
        config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
        items[:] = keep
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to JAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
