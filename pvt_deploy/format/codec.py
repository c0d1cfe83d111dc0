"""Dataclasses <-> JSON, driven by the type hints: the one writer and the one reader of every format section.

A field is written under its own name, in declaration order; a field whose value is None and whose default is None
is left out. Reading checks every value against its hint (``int`` never accepts ``true``, ``float`` must be finite)
and names the place of a bad value (``graphs.classify.fp32.file``). A class may bring its own ``to_json`` /
``from_json(value, where)`` (the preprocessing contract does). Semantic rules live in each class's
``__post_init__``, so the writer cannot build what the reader would refuse. A field with ``metadata={"json": False}``
is not part of the document (e.g. the folder a manifest was read from).

Supported hints: bool, int, float, str, ``Any`` (plain JSON, taken as is), ``X | None``, ``X | Y`` of scalars,
``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]`` and dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, Union


class FormatError(ValueError):
    """A document does not match its format; the message names where."""


def _label(where: str) -> str:
    return f"'{where}'" if where else "the document"


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _json_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]


def to_json(value: Any) -> Any:
    """A dataclass (or container of them) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if "to_json" in type(value).__dict__:
            return value.to_json()
        return dataclass_to_json(value)
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


def dataclass_to_json(value: Any) -> dict[str, Any]:
    """The fields of one dataclass instance as a JSON object (nested values through ``to_json``)."""
    document: dict[str, Any] = {}
    for item in _json_fields(type(value)):
        current = getattr(value, item.name)
        if current is None and item.default is None:
            continue
        document[item.name] = to_json(current)
    return document


def from_json(hint: Any, value: Any, where: str = "") -> Any:
    """``value`` read as ``hint`` (a type hint); ``FormatError`` naming ``where`` when it does not fit."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _union(typing.get_args(hint), value, where)
    if dataclasses.is_dataclass(hint):
        own = hint.__dict__.get("from_json")
        if own is not None:
            return own.__get__(None, hint)(value, where)
        return read_dataclass(hint, value, where)
    if origin is tuple:
        return _tuple(typing.get_args(hint), value, where)
    if origin is dict:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise FormatError(f"{_label(where)} must map names to values, got {_kind(value)}")
        return {key: from_json(item_hint, item, f"{where}.{key}" if where else key) for key, item in value.items()}
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise FormatError(f"{_label(where)} must be a list, got {_kind(value)}")
        return [from_json(item_hint, item, f"{where}[{index}]") for index, item in enumerate(value)]
    return _scalar(hint, value, where)


def _union(options: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise FormatError(f"{_label(where)} must not be null")
    real = [option for option in options if option is not type(None)]
    if len(real) == 1:
        return from_json(real[0], value, where)
    for option in real:
        try:
            return from_json(option, value, where)
        except FormatError:
            continue
    names = " or ".join(getattr(option, "__name__", str(option)) for option in real)
    raise FormatError(f"{_label(where)} must be {names}, got {_kind(value)}")


def _tuple(args: tuple[Any, ...], value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise FormatError(f"{_label(where)} must be a list, got {_kind(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(from_json(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if len(value) != len(args):
        raise FormatError(f"{_label(where)} must have {len(args)} values, got {len(value)}")
    return tuple(
        from_json(hint, item, f"{where}[{index}]") for index, (hint, item) in enumerate(zip(args, value, strict=True))
    )


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise FormatError(f"{_label(where)} must be true or false, got {_kind(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FormatError(f"{_label(where)} must be an integer, got {_kind(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise FormatError(f"{_label(where)} must be a finite number, got {_kind(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise FormatError(f"{_label(where)} must be a string, got {_kind(value)}")
    raise TypeError(f"no JSON reading for type hint {hint!r}")  # a programming error in a format class


def read_dataclass(cls: type, value: Any, where: str = "") -> Any:
    """``value`` (a JSON object) as an instance of the dataclass ``cls``. Unknown keys are ignored."""
    fields = _json_fields(cls)
    if not isinstance(value, dict):
        required = [f.name for f in fields if _required(f)] or [f.name for f in fields[:2]]
        shape = ", ".join(f"{name!r}: ..." for name in required)
        raise FormatError(f"{_label(where)} must be {{{shape}}}, got {_kind(value)}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for item in fields:
        key = f"{where}.{item.name}" if where else item.name
        if item.name not in value:
            if _required(item):
                kind = "section" if dataclasses.is_dataclass(hints[item.name]) else "value"
                raise FormatError(f"{'has' if not where else _label(where) + ' has'} no {item.name!r} {kind}")
            continue
        values[item.name] = from_json(hints[item.name], value[item.name], key)
    try:
        return cls(**values)
    except FormatError as exc:
        raise FormatError(f"{_label(where)}: {exc}" if where else str(exc)) from None


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _kind(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
