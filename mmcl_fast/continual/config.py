"""Method configs: one dataclass per method, filled from defaults, a JSON/YAML file and flags.

Every value passes through `coerce`, which checks it against the field's annotation (bool, int,
float, str, Optional[...], Literal[...], tuple/list of those); an unknown key or a value of the
wrong type is a ValueError that names the key. Range checks (lr > 0, ...) live in each config's
`__post_init__`, with `check` below, so that they name the key too.

Values may arrive as strings (command-line flags, `--set key=value`): "3" is an int where an int
is wanted, "true"/"false" a bool, "none"/"null" None, and "[1, 2]" a list (parsed as JSON).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null", "")
_UNIONS = (typing.Union, types.UnionType)  # Optional[int] and int | None


def fields(cls) -> dict[str, Any]:
    """The config's field names and their resolved annotations (strings under
    `from __future__ import annotations` are resolved here)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNIONS:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_describe(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp) -> Any:
    """`value` as an instance of annotation `tp`, or ValueError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ValueError(f"config key {key!r}: expected {_describe(tp)}, got {value!r}")
    if origin in _UNIONS:
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ValueError:
                continue
        raise bad
    if origin is typing.Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and not isinstance(choice, str) and value.strip() == str(choice):
                return choice
        raise bad
    if origin in (tuple, list):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
            items = [coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _coerce_layer(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with every key checked against `cls`'s fields and every value coerced."""
    if not isinstance(values, Mapping):
        # every config error is a ValueError: the one exception the CLI reports as a usage error
        raise ValueError(f"a config must be a mapping of keys to values, got {type(values).__name__}")  # noqa: TRY004
    known = fields(cls)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r} for {cls.__name__}; known keys: {', '.join(known)}")
    return {k: coerce(k, v, known[k]) for k, v in values.items()}


def config_from_dict(cls: type[T], values: Mapping[str, Any], base: T | None = None) -> T:
    """A `cls` instance: `base` (or the defaults) with `values` applied, every value checked.

    Unknown keys and wrong types raise ValueError naming the key (and listing the known keys)."""
    current = {} if base is None else dataclasses.asdict(base)
    current.update(_coerce_layer(cls, values))
    return cls(**current)


def config_from_layers(cls: type[T], layers: Iterable[Mapping[str, Any] | None]) -> T:
    """A `cls` instance from the defaults and then each layer in turn (later layers win).

    Each layer's keys and values are checked and coerced, the layers are merged into one dict, and
    the dataclass is built once: its cross-field checks (`__post_init__`) see the final values
    only, so `num_tasks` from one layer and `classes_per_task` from another are checked together."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update(_coerce_layer(cls, layer))
    return cls(**merged)


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of the config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def parse_assignment(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value); the value stays a string (coerce parses it)."""
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ValueError(f"expected key=value, got {text!r}")
    return key, value


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    return dict(parse_assignment(t) for t in items)


def load_config_file(path: str) -> dict[str, Any]:
    """A config file's mapping: JSON, or YAML (.yaml/.yml) when pyyaml is importable."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"config file {path!r} is YAML but pyyaml is not installed; use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path!r} is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path!r} is not valid JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys to values, "  # noqa: TRY004
                         f"got {type(data).__name__}")
    return data


def check(key: str, ok: bool, requirement: str, value: Any) -> None:
    """Raise ValueError naming `key` unless `ok`: for range checks in a config's __post_init__."""
    if not ok:
        raise ValueError(f"config key {key!r} must be {requirement}, got {value!r}")
