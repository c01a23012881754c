"""The fine-step method registry: named layer-wise pruners and the input statistics each one needs.

A method is one function ``prune_(weight, statistics, sparsity, config) -> mask`` registered under a name with
:func:`register_method`, which also declares what the fine step must measure for it: ``"none"`` (no calibration
forward at all), ``"column_norms"`` (``Σ x_j²`` per input column) or ``"gram"`` (also ``Σ x xᵀ``).
``PruningConfig.method`` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ecoflap_pl.pruning.registry import Registry

if TYPE_CHECKING:
    from ecoflap_pl.pruning.config import PruningConfig
    from ecoflap_pl.pruning.statistics import InputStatistics

MethodInputs = Literal["none", "column_norms", "gram"]
PruneFn = Callable[[torch.Tensor, "InputStatistics | None", float, "PruningConfig"], torch.Tensor]
"""``prune_(weight, statistics, sparsity, config) -> mask``: prunes ``weight`` (``[out, in]``) in place to exactly
``round(numel · sparsity)`` zeros and returns the bool mask (``True`` = kept). ``statistics`` is ``None`` for a method
whose inputs are ``"none"``."""


@dataclass(frozen=True)
class FineMethod:
    """A registered fine-step method.

    Attributes:
        name: the ``PruningConfig.method`` value.
        prune: the in-place pruner (:data:`PruneFn`).
        inputs: the input statistics it reads: ``"none"``, ``"column_norms"`` or ``"gram"``.
        default_comparison: ``PruningConfig.comparison`` when left unset (``"per_row"`` or ``"per_matrix"``).
    """

    name: str
    prune: PruneFn
    inputs: MethodInputs
    default_comparison: str

    @property
    def needs_inputs(self) -> bool:
        """Whether the fine step must replay the blocks to measure this method's input statistics."""
        return self.inputs != "none"


_METHODS: Registry[FineMethod] = Registry(
    "A fine-step method named", "method", "register a new method with @register_method(name, inputs=...)."
)


def register_method(
    name: str, *, inputs: MethodInputs, default_comparison: str = "per_matrix"
) -> Callable[[PruneFn], PruneFn]:
    """Decorator registering ``prune_(weight, statistics, sparsity, config) -> mask`` under ``name``.

    Args:
        name: the ``PruningConfig.method`` value.
        inputs: the input statistics the method reads: ``"none"``, ``"column_norms"`` or ``"gram"``.
        default_comparison: ``comparison`` when the config leaves it unset.
    """
    if inputs not in ("none", "column_norms", "gram"):
        raise ValueError(f"`inputs` must be one of ['none', 'column_norms', 'gram'], got {inputs!r}.")
    if default_comparison not in ("per_row", "per_matrix"):
        raise ValueError(f"`default_comparison` must be 'per_row' or 'per_matrix', got {default_comparison!r}.")

    def register(prune: PruneFn) -> PruneFn:
        _METHODS.add(name, FineMethod(name, prune, inputs, default_comparison))
        return prune

    return register


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return _METHODS.names()


def get_method(name: str) -> FineMethod:
    """The method registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return _METHODS.lookup(name)
