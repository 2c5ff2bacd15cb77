"""Load the official PyTorch NAT / DiNAT checkpoints into :class:`natten_jax.models.NAT`.

Our parameter tree mirrors the official module names, so a PyTorch name is the Flax path joined
with dots, with the leaf renamed and the layout changed:

=================================  ===========================  ==============================
Flax leaf                          PyTorch name                 layout
=================================  ===========================  ==============================
``nnx.Conv`` ``kernel`` (HWIO)     ``...weight`` (OIHW)         ``transpose(2, 3, 1, 0)``
``nnx.Linear`` ``kernel`` (in,out) ``...weight`` (out, in)      ``.T``
``nnx.LayerNorm`` ``scale``        ``...weight``                as is
``bias``, ``rpb``, ``gamma1/2``    same name                    as is
=================================  ===========================  ==============================

e.g. ``patch_embed.proj.0.weight``, ``levels.2.blocks.5.attn.qkv.weight``,
``levels.2.blocks.5.attn.rpb``, ``levels.0.downsample.reduction.weight``, ``norm.bias``,
``head.weight``. The qkv output channels are ``[3, heads, head_dim]`` in both (NATTEN's layout).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Tuple

import numpy as np
from flax import nnx

__all__ = ["convert_torch_state_dict", "load_torch_checkpoint", "torch_name"]


def torch_name(path: Tuple[Any, ...]) -> str:
    """The PyTorch state-dict name of the Flax parameter at ``path``."""
    *mods, leaf = (str(p) for p in path)
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join(mods + [leaf])


def _to_flax_layout(path, value: np.ndarray, target_ndim: int) -> np.ndarray:
    if str(path[-1]) != "kernel":
        return value
    if target_ndim == 4:  # conv: OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
    if target_ndim == 2:  # linear: (out, in) -> (in, out)
        return value.T if value.ndim == 2 else value
    return value


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach()
        if hasattr(value, "cpu"):
            value = value.cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def _summary(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_torch_state_dict(state_dict: Mapping[str, Any], model: nnx.Module, *,
                             strict: bool = True, exclude: Iterable[str] = ()) -> nnx.Module:
    """Copy an official PyTorch state dict into ``model`` (in place; also returned).

    Args:
      state_dict: name -> array (NumPy arrays, or anything with ``.numpy()`` such as torch
        tensors).
      model: a :class:`natten_jax.models.NAT` (any NNX module whose parameter paths follow the
        official names) built with the checkpoint's configuration.
      strict: raise ``ValueError`` on names missing from ``state_dict`` or present only there.
        With ``strict=False`` those are skipped (missing parameters keep their values).
      exclude: name prefixes ignored on both sides (e.g. ``("head.",)`` to keep a freshly
        initialised classifier when fine-tuning with another number of classes).

    Shape mismatches always raise ``ValueError``. Values are cast to each parameter's dtype.
    Nothing is modified unless the whole conversion succeeds.
    """
    exclude = tuple(exclude)
    skip = lambda n: any(n.startswith(p) for p in exclude)  # noqa: E731
    state = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(state))
    targets: Dict[str, Tuple[Tuple[Any, ...], Any]] = {}
    for path, var in flat:
        name = torch_name(path)
        if skip(name):
            continue
        if name in targets:  # pragma: no cover - only for unusual module trees
            raise ValueError(f"Two parameters map to the PyTorch name {name!r}.")
        targets[name] = (path, var)
    given = {k for k in state_dict if not skip(k)}
    missing = set(targets) - given
    unexpected = given - set(targets)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_summary(unexpected)}")
        raise ValueError("State dict does not match the model: " + "; ".join(parts) + ".")

    new_values = {}
    for name in sorted(given & set(targets)):
        path, var = targets[name]
        current = var.get_value()
        value = _to_flax_layout(path, _to_numpy(state_dict[name]), len(current.shape))
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"Shape mismatch for {name!r}: checkpoint gives {tuple(value.shape)} (after "
                f"layout conversion), the model expects {tuple(current.shape)}.")
        new_values[name] = np.asarray(value, dtype=current.dtype)
    for name, value in new_values.items():
        targets[name][1].set_value(value)
    nnx.update(model, state)
    return model


def _unwrap(checkpoint) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint (plain, or under 'state_dict' / 'model')."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping):  # a state dict's own values are tensors, not mappings
                return _strip_module_prefix(inner)
        return _strip_module_prefix(checkpoint)
    raise TypeError(f"Expected a state dict (mapping) in the checkpoint, got {type(checkpoint)}.")


def _strip_module_prefix(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_torch_checkpoint(path: str, model: nnx.Module, **kwargs) -> nnx.Module:
    """Load an official ``.pth`` checkpoint (e.g. from :data:`natten_jax.models.CHECKPOINT_URLS`)
    into ``model``. Needs PyTorch (imported here only). Keyword arguments go to
    :func:`convert_torch_state_dict`."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "load_torch_checkpoint needs PyTorch to read .pth files (pip install torch). "
            "Alternatively load the state dict elsewhere, turn it into a dict of NumPy arrays "
            "and call convert_torch_state_dict.") from e
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        checkpoint = torch.load(path, map_location="cpu")
    return convert_torch_state_dict(_unwrap(checkpoint), model, **kwargs)
