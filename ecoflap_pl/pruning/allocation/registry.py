"""The allocation registry: named strategies that turn what a run measured into one sparsity per group.

A strategy is one function ``strategy(request) -> Allocation`` registered under a name with
:func:`register_allocation`; ``PruningConfig.allocation`` picks it. The request gives lazy access to what a strategy
may need (coarse scores, the dense model's outlier ratios, a held-out evaluation of a candidate), so a strategy only
pays for what it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.registry import Registry

if TYPE_CHECKING:
    from ecoflap_pl.pruning.result import GroupScores


@dataclass(frozen=True)
class AllocationRequest:
    """Everything a strategy may read. The callables compute on first use and are cached by the pipeline.

    Attributes:
        config: the run's configuration (``sparsity``, ``max_sparsity``, ``prune_per_model``, ``owl_*``, ...).
        sizes: group -> parameter count ``N_g``.
        groups: group -> parameter names, in forward order.
        towers: tower (stack name) -> its groups.
        scores: the coarse step's group scores (runs the configured ``importance`` estimator).
        outlier_ratios: ``outlier_ratios(m)`` -> group -> OWL outlier ratio of the dense model.
        evaluate: ``evaluate(name, group_sparsity)`` runs the fine step with that allocation, returns the held-out
            loss and restores the model (``auto`` only).
    """

    config: PruningConfig
    sizes: Mapping[str, int]
    groups: Mapping[str, tuple[str, ...]]
    towers: Mapping[str, tuple[str, ...]]
    scores: Callable[[], GroupScores]
    outlier_ratios: Callable[[float], Mapping[str, float]]
    evaluate: Callable[[str, Mapping[str, float]], float]

    def with_config(self, **changes: Any) -> AllocationRequest:
        """The same request with some config fields changed (validated again)."""
        return replace(self, config=replace(self.config, **changes))


@dataclass(frozen=True)
class CandidateAllocation:
    """One allocation tried by ``auto``: its name, per-group sparsity and loss on the held-out batches."""

    name: str
    group_sparsity: dict[str, float]
    heldout_loss: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group_sparsity": dict(self.group_sparsity), "heldout_loss": self.heldout_loss}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateAllocation:
        sparsity = {g: float(s) for g, s in data["group_sparsity"].items()}
        return cls(str(data["name"]), sparsity, float(data["heldout_loss"]))


@dataclass(frozen=True)
class Allocation:
    """A strategy's answer: group -> sparsity, and for ``auto`` every candidate tried and the chosen one's name."""

    group_sparsity: dict[str, float]
    candidates: tuple[CandidateAllocation, ...] = field(default=())
    chosen: str | None = None


AllocationStrategy = Callable[[AllocationRequest], Allocation]
_STRATEGIES: Registry[AllocationStrategy] = Registry(
    "An allocation named", "allocation", "register a new strategy with @register_allocation(name)."
)


_READ_NO_SCORES: set[str] = set()
"""The strategies registered with ``reads_scores=False``."""


def register_allocation(name: str, *, reads_scores: bool = True) -> Callable[[AllocationStrategy], AllocationStrategy]:
    """Decorator registering ``strategy(request) -> Allocation`` under ``name`` (``PruningConfig.allocation``).

    ``reads_scores=False`` declares a strategy that never calls ``request.scores()``: a run with it has no coarse
    step, so its calibration set is checked, and read by the ``ecoflap`` command, for the fine step alone.
    """

    def register(strategy: AllocationStrategy) -> AllocationStrategy:
        registered = _STRATEGIES.add(name, strategy)
        if not reads_scores:
            _READ_NO_SCORES.add(name)
        return registered

    return register


def allocation_reads_scores(name: str) -> bool:
    """Whether the strategy registered under ``name`` reads the coarse step's scores (:func:`register_allocation`)."""
    return name not in _READ_NO_SCORES


def allocation_names() -> tuple[str, ...]:
    """The registered allocation names, in registration order."""
    return _STRATEGIES.names()


def get_allocation(name: str) -> AllocationStrategy:
    """The strategy registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return _STRATEGIES.lookup(name)
