"""Where the weights live while pruning: a seam for models whose weights are loaded on demand.

A model dispatched with offloaded weights (Accelerate's big-model placement keeps them in CPU memory or on disk and
loads each module's weights for its forward call) has no weight tensor to read or change between forward calls. The
engine then asks a :class:`Residency` to hold the weights it names resident while it scores or prunes them, and to
store the changed ones back. The engine knows no offloading library; ``ecoflap_pl.models.placement`` implements
this for Accelerate.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Residency(Protocol):
    """Makes offloaded weights resident on demand."""

    def resident(self, names: Sequence[str], write_back: bool) -> AbstractContextManager[None]:
        """Hold the weights of the modules or parameters ``names`` resident (real tensors with a fixed identity, used
        as they are by forward calls); on a normal exit, with ``write_back``, store the ones that changed."""
        ...

    def offloaded(self, name: str) -> bool:
        """Whether the module or parameter ``name`` (or part of it) is offloaded."""
        ...


def resident(residency: Residency | None, names: Sequence[str], write_back: bool) -> AbstractContextManager[None]:
    """``residency.resident(names, write_back)``, or nothing to do for a model whose weights always are resident."""
    return nullcontext() if residency is None else residency.resident(names, write_back)
