"""Command-line pieces every benchmark shares: comma-separated name lists and the fused
backend's configuration (``--fused-config``), passed to natten_jax as ``backend_config=``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Optional, Sequence

FUSED_CONFIG_HELP = (
    "configuration of the fused backend, as comma-separated field=value of "
    "natten_jax.FusedConfig (forward_impl, backward_impl, backward, autotune, q_tile, "
    "sm80_occupancy, cache_dir; 'none' for None), on top of its defaults "
    "(natten_jax.config.default_config(): the documented environment variables); e.g. "
    "forward_impl=sm90,backward=reference")


def names(text: Optional[str], allowed: Sequence[str], what: str,
          aliases: Optional[Dict[str, str]] = None) -> List[str]:
    """The names of a comma-separated list, each one of ``allowed`` (after ``aliases``);
    '' or 'none' (quotes that survived a shell variable stripped): none. Unknown names exit
    with a message naming ``what`` (the option)."""
    aliases = aliases or {}
    out = [x.strip().strip("'\"") for x in text.split(",")] if text else []
    out = [aliases.get(x, x) for x in out if x and x != "none"]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"{what}: unknown {bad}; known: {list(allowed)}")
    return out


def add_fused_config(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fused-config", default="", metavar="FIELD=VALUE,...",
                    help=FUSED_CONFIG_HELP)


def fused_config(text: str = "", base=None):
    """The ``natten_jax.FusedConfig`` that ``--fused-config text`` names: ``base`` (default
    :func:`natten_jax.config.default_config`) with the fields given. A bad field or value exits
    with a message naming --fused-config."""
    from natten_jax.config import default_config

    base = default_config() if base is None else base
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in fields:
            raise SystemExit(f"--fused-config: expected field=value with a field of "
                             f"{sorted(fields)}, got {item!r}")
        if value.lower() == "none":
            changes[key] = None
        elif "int" in str(fields[key].type):
            try:
                changes[key] = int(value)
            except ValueError:
                raise SystemExit(f"--fused-config: {key} takes an integer or none, got "
                                 f"{value!r}") from None
        else:
            changes[key] = value
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--fused-config: {e}") from None


def config_json(config) -> dict:
    """A FusedConfig as the JSON of a run records it."""
    return dataclasses.asdict(config)
