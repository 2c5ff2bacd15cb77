"""The fused kernels Python plans for are the ones the module is built with.

src/cuda/include/natten_jax/fna/kernel_table.h is the one table of fused-kernel instantiations;
the compiled module reports it (``natten_jax._C.fused_kernels()``), and Python's own constants
(used where no module is built) must agree with it. CI builds the module, so this runs there.
"""

import pytest

from natten_jax import _ffi, config, tiles
from natten_jax.backends import fused

pytestmark = pytest.mark.skipif(not _ffi.module_available(), reason="natten_jax._C not built")


def table():
    import natten_jax._C as C

    return C.fused_kernels()


def test_head_dims_agree_with_the_kernel_table():
    t = table()
    assert tuple(t["sm80_head_dims"]) == fused.HEAD_DIMS
    assert tuple(t["sm90_head_dims"]) == tiles.SM90_HEAD_DIMS
    for d in (16, 32, 48, 64, 96, 128, 256):
        assert tiles.impl_supports("sm90", d) == (d in t["sm90_head_dims"])


def test_occupancies_and_kv_tile_agree_with_the_kernel_table():
    t = table()
    assert tuple(t["sm80_occupancies"]) == config.SM80_OCCUPANCIES
    assert t["kv_tile_tokens"] == 1 << tiles.KV_TILE_LOG2
    assert t["sm90_forward_wide_kv_tile_tokens"] == 1 << tiles.SM90_WIDE_KV_TILE_LOG2


def test_float32_rules_agree_with_the_kernel_table():
    """float32 (issue 23): Python's can_run rules (natten_jax.tiles: 64-token Q tiles, head dims
    above F32_MAX_HEAD_DIM_BEFORE_MIN_MAJOR only on compute capability 9.x) are the kernel
    table's (kFloat32MaxHeadDimBefore90), once the module reports them."""
    t = table()
    if "float32_max_head_dim_before_90" not in t:
        pytest.skip("this build's fused_kernels() does not report its float32 rules")
    assert t["float32_max_head_dim_before_90"] == tiles.F32_MAX_HEAD_DIM_BEFORE_MIN_MAJOR
    assert t["float32_q_tile_tokens"] == 1 << tiles.F32_Q_TILE_LOG2
