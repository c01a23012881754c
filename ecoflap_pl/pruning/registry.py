"""The registry every named extension point shares (methods, estimators, score variants, allocations, the tasks'
model families): entries added under new names, kept in registration order, and a look-up whose error lists the
known names with a ``HINT:`` (:func:`unknown_name`: the close name meant, for a typo). A test that registers an
extra entry swaps in a :meth:`Registry.copy`."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def normalized_name(value: str) -> str:
    """``value`` as the registered names are spelt: surrounding spaces, case and hyphens do not count
    (``" Sparse-GPT"`` -> ``"sparse_gpt"``)."""
    return value.strip().lower().replace("-", "_")


def unknown_name(option: str, value: object, names: Sequence[str], hint: str = "", purpose: str = "") -> ValueError:
    """The error for ``value`` of ``option`` outside ``names``: "`option` must be one of [...]{purpose}, got 'value'.",
    with "HINT: did you mean 'name'?" where one of ``names`` is close to it (a typo), else ``HINT: {hint}``."""
    close = difflib.get_close_matches(normalized_name(str(value)), list(names), n=1, cutoff=0.75)
    said = f"did you mean {close[0]!r}?" if close else hint
    message = f"`{option}` must be one of {list(names)}{purpose}, got {value!r}."
    return ValueError(f"{message} HINT: {said}" if said else message)


class Registry(Mapping[str, T]):
    """Name -> entry, in registration order; read like any mapping.

    Args:
        what: the kind of entry as the duplicate-name error starts it (``"A score variant named"``).
        option: the config field whose value is looked up (``"score"``), named in the unknown-name error.
        hint: how to add an entry, the ``HINT:`` of the unknown-name error.
        purpose: words after the list of names in that error (``" to score groups"``).
    """

    def __init__(self, what: str, option: str, hint: str, purpose: str = "") -> None:
        self.what, self.option, self.hint, self.purpose = what, option, hint, purpose
        self._entries: dict[str, T] = {}

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, entry: T) -> T:
        """Store ``entry`` under ``name`` and return it.

        Raises:
            ValueError: when ``name`` is taken.
        """
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry under ``name``.

        Raises:
            ValueError: for an unknown name (:func:`unknown_name`, with ``hint`` where no known name is close).
        """
        if name not in self._entries:
            raise unknown_name(self.option, name, list(self._entries), self.hint, self.purpose)
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def copy(self) -> Registry[T]:
        """A registry with the same settings and entries, filled independently from now on."""
        duplicate: Registry[T] = Registry(self.what, self.option, self.hint, self.purpose)
        duplicate._entries.update(self._entries)
        return duplicate
