"""Type checks of a frozen config's fields, driven by the fields' annotations: one rule per type, one message shape.

Written by hand: the engine imports torch and the standard library only (docs/architecture.md), so pydantic or
typeguard cannot check it, and their rules are not the ones wanted here either: an ``int`` field takes an integral
float (``32.0``, as a script or a JSON file may write it) but refuses ``True`` and ``2.5``; a ``float`` field takes an
int but refuses a string and NaN or infinity; a ``tuple[str, ...]`` field takes one string as a one-element tuple.

The annotations understood: ``bool``, ``int``, ``float``, ``str``, ``Literal`` of strings, :data:`PathString`,
``tuple[str, ...]`` and unions of them with ``None``. The CLI gives each value its type before a config is built
(jsonargparse reads the callback's signature), so these checks matter for values set from Python or read from JSON.
"""

from __future__ import annotations

import math
import numbers
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints


class _Path:
    """Marks a ``str`` field that also takes an ``os.PathLike`` (stored as its string)."""


PathString = Annotated[str, _Path]
"""A file path field: a string, or an ``os.PathLike`` stored as its string."""


class SettingTypeError(TypeError, ValueError):
    """A setting of the wrong type. Also a ValueError, as every other setting a config refuses."""


class _Refused(Exception):
    """A value that does not fit one annotation: what was expected, and the error class to raise."""

    def __init__(self, expected: str, error: type[ValueError] = SettingTypeError) -> None:
        super().__init__(expected)
        self.expected = expected
        self.error = error


def check_field_types(config: Any) -> None:
    """Check every field of the dataclass instance ``config`` against its annotation, storing the normalised value
    (``int`` for an integral float, ``float`` for an int, a tuple for a list, a string for a path).

    Raises:
        SettingTypeError: a value of the wrong type, e.g. ``eps='1e-3'``; names the field, the value and its type,
            what is expected and a ``HINT``.
        ValueError: a float that is NaN or infinite.
    """
    annotations = get_type_hints(type(config), include_extras=True)
    for field in fields(config):
        value, annotation = getattr(config, field.name), annotations[field.name]
        try:
            checked = _checked(value, annotation)
        except _Refused as refused:
            shown = f"{value!r}" if refused.error is ValueError else f"{value!r} ({type(value).__name__})"
            hint = _hint(field, value, annotation)
            raise refused.error(f"`{field.name}` must be {refused.expected}, got {shown}. HINT: {hint}") from None
        object.__setattr__(config, field.name, checked)


def _checked(value: Any, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [option for option in get_args(annotation) if option is not type(None)]
        if value is None and len(options) < len(get_args(annotation)):
            return None
        refusals = []
        for option in options:
            try:
                return _checked(value, option)
            except _Refused as refused:
                refusals.append(refused)
        nullable = " or None" if len(options) < len(get_args(annotation)) else ""
        first = next((refused for refused in refusals if refused.error is ValueError), refusals[0])
        raise _Refused(first.expected + nullable, first.error)
    if origin is Annotated:
        base, *marks = get_args(annotation)
        if _Path in marks and isinstance(value, os.PathLike):
            return _checked(os.fspath(value), base)
        if _Path in marks and not isinstance(value, str):
            raise _Refused("a path (a string or an os.PathLike)")
        return _checked(value, base)
    if origin is Literal or annotation is str:
        if not isinstance(value, str):
            raise _Refused("a string")
        return value
    if origin is tuple and get_args(annotation) == (str, ...):
        return _strings(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise _Refused("True or False")
        return value
    if annotation is int:
        return _integer(value)
    if annotation is float:
        return _finite(value)
    raise TypeError(f"check_field_types cannot check the annotation {annotation!r}.")


def _integer(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Refused("an integer")


def _finite(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _Refused("a number")
    if not math.isfinite(value):
        raise _Refused("a finite number", ValueError)
    return float(value)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return items
    raise _Refused("a string or a list of strings")


def _hint(field: Field[Any], value: Any, annotation: Any) -> str:
    if isinstance(value, str):
        for reading in _readings(value):
            try:
                accepted = _checked(reading, annotation)
            except _Refused:
                continue
            return f"pass the value itself, not a string: {field.name}={accepted!r}."
    return "no default." if field.default is MISSING else f"the default is {field.default!r}."


def _readings(text: str) -> list[Any]:
    """What a string holding a number or a bool reads as (``"1e-3"`` -> 0.001), for the hint."""
    readings: list[Any] = []
    for parse in (int, float):
        try:
            readings.append(parse(text))
        except ValueError:
            pass
    if text.strip().lower() in ("true", "false"):
        readings.append(text.strip().lower() == "true")
    return readings
