"""Typed configs: build frozen dataclasses from nested dicts / ml_collections, validated on load.

Every section of a config is a frozen dataclass. ``from_dict`` walks the dataclass fields, so a
wrong key, a wrong type or (via each dataclass's ``__post_init__``) a wrong value fails with the
dotted path of the field before any compute starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from rema_jax.errors import UserError

T = TypeVar("T")


class ConfigError(ValueError, UserError):
    """A config key, type or value is wrong. The message names the dotted field path."""


def _to_plain(value: Any) -> Any:
    """ml_collections ConfigDict / FrozenConfigDict → plain dicts (recursively)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            with contextlib.suppress(ConfigError):  # another member may accept it; the error below names the union
                return _check_type(value, arg, path)
        raise ConfigError(f"{path}: expected {hint}, got {value!r} ({type(value).__name__})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a tuple, got {value!r} ({type(value).__name__})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return (
            tuple(_check_type(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            if args
            else tuple(value)
        )
    if origin in (dict, typing.Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an int, got {value!r} ({type(value).__name__})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected a bool, got {value!r} ({type(value).__name__})")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type[T], data: Any, path: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys and wrong types.

    Missing keys take the dataclass defaults. Values are validated again by the dataclass's own
    ``__post_init__``; a ``ValueError`` raised there is re-raised with the field path.
    """
    data = _to_plain(data)
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(_to_plain(data[name]), hints[name], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) → plain dict, tuples kept as lists for JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
