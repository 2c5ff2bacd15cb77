"""Backend switches that need no GPU."""

import pytest

from natten_jax.backends import fused


def test_backward_mode_env(monkeypatch):
    monkeypatch.delenv(fused.BACKWARD_ENV, raising=False)
    assert fused.backward_mode() == "kernel"
    monkeypatch.setenv(fused.BACKWARD_ENV, "reference")
    assert fused.backward_mode() == "reference"
    monkeypatch.setenv(fused.BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match=fused.BACKWARD_ENV):
        fused.backward_mode()
