"""Dataclass annotations as the types of settings: checking values against them and describing them.

Settings classes (:class:`cola.llm.TrainSettings`) declare each field once, with its annotation
(``int``, ``float | None``, ``list[str] | None``, ``dict[str, Any]``, ...); this module checks a
value read from a config file or a mapping against that annotation and says what was expected,
and tells the command line which kind of flag a field needs. ``bool`` is not an integer here, an
``int`` is accepted where a ``float`` is expected, and ``None`` only where the annotation allows it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from functools import cache
from typing import Any, Union

__all__ = ["field_types", "matches", "describe", "type_problem", "is_optional", "base_type"]

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


@cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def is_optional(tp: Any) -> bool:
    """True when ``None`` is an allowed value of ``tp``."""
    args = _union_args(tp)
    return args is not None and type(None) in args


def base_type(tp: Any) -> Any:
    """``tp`` without its ``None``: ``int | None`` -> ``int``, ``list[str] | None`` -> ``list[str]``."""
    args = _union_args(tp)
    if args is None:
        return tp
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else Union[tuple(rest)]


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is a ``tp`` (as read from JSON/TOML/YAML: lists, dicts and scalars)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    args = _union_args(tp)
    if args is not None:
        return any(matches(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(matches(k, key) and matches(v, item) for k, v in value.items())
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    """What ``tp`` asks for, in words: ``an integer or nothing``, ``a list of strings``, ``a table``."""
    if is_optional(tp):
        return f"{describe(base_type(tp))} or nothing"
    if tp in _NAMES:
        return _NAMES[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        inner = describe(item)
        return "a list" if item is Any else f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    args = _union_args(tp)
    if args is not None:
        return " or ".join(describe(a) for a in args)
    return f"a {getattr(tp, '__name__', tp)}"


def type_problem(name: str, value: Any, tp: Any) -> str | None:
    """``None`` when ``value`` fits ``tp``, else ``name=value: expected <what>, got <type>``."""
    if matches(value, tp):
        return None
    return f"{name}={value!r}: expected {describe(tp)}, got {type(value).__name__}"
