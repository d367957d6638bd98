"""Configs as data: frozen dataclasses to and from JSON-able dicts, checked, plus ``key=value`` overrides.

Every setting of the pretraining core (model, losses, schedules, sampler, run) is a frozen dataclass whose
fields are plain JSON values (numbers, strings, booleans, lists for tuples, nested objects). These helpers
turn a dict from a JSON file (or from a checkpoint's metadata) into such a dataclass, refusing unknown keys
and values of the wrong type with one clear line (:class:`MammoInputError`), and apply command-line
overrides such as ``schedule.base_lr=1e-3`` or ``model.reg_tokens=4``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Sequence, TypeVar, Union

from training.errors import MammoInputError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as a JSON-able dict (tuples become lists; nested configs use their own ``to_dict``)."""
    out = {}
    for f in dataclasses.fields(config):
        out[f.name] = _plain(getattr(config, f.name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], values: Any, what: str | None = None) -> T:
    """Build dataclass ``cls`` from JSON data; missing keys take their defaults. Unknown keys and values of
    the wrong type raise :class:`MammoInputError` naming the setting (``what.key``)."""
    what = what or cls.__name__
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise MammoInputError(f"{what}: expected an object of settings, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise MammoInputError(f"{what}: unknown keys {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{what}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except MammoInputError:
        raise
    except (TypeError, ValueError) as exc:
        raise MammoInputError(f"{what}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting lists to tuples and dicts to nested configs."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except MammoInputError as exc:
                problems.append(str(exc))
        raise MammoInputError(problems[0] if len(problems) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise MammoInputError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MammoInputError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise MammoInputError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if dataclasses.is_dataclass(hint):
        if hasattr(hint, "from_dict") and isinstance(value, dict):
            return hint.from_dict(value)
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise MammoInputError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MammoInputError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MammoInputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise MammoInputError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise MammoInputError(f"{where}: expected null, got {value!r}")
        return None
    return value  # Any or an unannotated field: take it as given


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``values`` with each ``dotted.key=value`` applied. The value is read as JSON when it parses
    (``1e-3``, ``true``, ``[96, 48]``, ``null``) and as a plain string otherwise (``sinkhorn_knopp``).
    Keys are checked later, by :func:`from_dict`, against the dataclass they land in."""
    out = json.loads(json.dumps(values))  # a deep copy that is plain JSON
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise MammoInputError(f"override {item!r}: write it as section.key=value, e.g. schedule.base_lr=1e-3")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MammoInputError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out
