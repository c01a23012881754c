"""The registry every named extension point shares (methods, estimators, score variants, allocations, the tasks'
model families): entries added under new names, kept in registration order, and a look-up whose error lists the
known names with a ``HINT:``. A test that registers an extra entry swaps in a :meth:`Registry.copy`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


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
            ValueError: "`option` must be one of [...]{purpose}, got 'name'. HINT: {hint}" for an unknown name.
        """
        if name not in self._entries:
            raise ValueError(
                f"`{self.option}` must be one of {list(self._entries)}{self.purpose}, got {name!r}. HINT: {self.hint}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def copy(self) -> Registry[T]:
        """A registry with the same settings and entries, filled independently from now on."""
        duplicate: Registry[T] = Registry(self.what, self.option, self.hint, self.purpose)
        duplicate._entries.update(self._entries)
        return duplicate
