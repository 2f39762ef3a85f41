"""The methods, by name: each is a config dataclass plus a builder that turns a config into an
`Experiment` (a stream and a `ContinualMethod`), so that `mmcl-fast run <name>` can build, run and
report any of them, and `mmcl-fast run --help` can list them.

    spec = get_method("digits")
    config = spec.make_config({"epochs": 3})            # unknown keys / wrong types: ValueError
    experiment = spec.build(config)

New methods (MSPT, MoFot, COMM) register themselves with `register_method` in their module and
are imported at the bottom of this file.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..continual.config import config_from_layers, load_config_file


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, a one-line summary, its config dataclass and its builder
    (config -> mmcl_fast.continual.Experiment)."""

    name: str
    summary: str
    config_cls: type
    build: Callable[[Any], Any]

    def make_config(self, values: Mapping[str, Any] | None = None, file: str | None = None,
                    overrides: Mapping[str, Any] | None = None):
        """Defaults, then the file's values, then `values`, then `overrides`: each layer's keys and
        values checked (a ValueError names the bad key), then all merged into one dict and the
        config built once, so that cross-field checks see the final values only."""
        return config_from_layers(self.config_cls, (load_config_file(file) if file else None, values, overrides))


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, summary: str, config_cls: type, build: Callable[[Any], Any]) -> MethodSpec:
    """Register a method under `name` (a new name, or the same spec again)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of method {name!r} must be a dataclass")
    spec = MethodSpec(name, summary, config_cls, build)
    old = _REGISTRY.get(name)
    if old is not None and old != spec:
        raise ValueError(f"a method named {name!r} is already registered")
    _REGISTRY[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def methods() -> list[MethodSpec]:
    return [_REGISTRY[n] for n in method_names()]


from . import digits  # noqa: F401  (registers "digits")
from . import mofot  # noqa: F401, E402  (registers "mofot")
from . import mspt  # noqa: F401, E402  (registers "mspt")

__all__ = ["MethodSpec", "get_method", "method_names", "methods", "register_method"]
