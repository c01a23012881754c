"""The two operations every engine registry shares (methods, estimators, score variants, allocations): add an entry
under a new name, and look a name up with an error that lists the known ones. Each registry stays a plain module-level
dict, so a test can swap in a copy."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TypeVar

T = TypeVar("T")


def add_entry(entries: MutableMapping[str, T], name: str, entry: T, what: str) -> T:
    """Store ``entry`` under ``name``; ``what`` names the kind in the error (``"A score variant"``).

    Raises:
        ValueError: when ``name`` is taken.
    """
    if name in entries:
        raise ValueError(f"{what} named {name!r} is already registered.")
    entries[name] = entry
    return entry


def look_up(entries: Mapping[str, T], name: str, option: str, hint: str, purpose: str = "") -> T:
    """The entry under ``name``.

    Raises:
        ValueError: "`option` must be one of [...]{purpose}, got 'name'. HINT: {hint}" for an unknown name.
    """
    if name not in entries:
        raise ValueError(f"`{option}` must be one of {list(entries)}{purpose}, got {name!r}. HINT: {hint}")
    return entries[name]
