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
