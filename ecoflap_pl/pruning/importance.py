"""The importance estimator registry: how the coarse step measures one score per group.

An estimator is a pair registered under a name with :func:`register_importance`: ``measure(request)`` returns raw
per-unit sums over this rank's calibration batches (linear in the batches, so the pipeline sums them over ranks),
and ``combine(raw, request, batch_count)`` turns the global sums into group scores with the configured score
variant. The built-ins report the **mean over the coarse batches** (docs/algorithm.md §2, Scale), so first- and
zeroth-order scores are on the same per-batch scale. ``PruningConfig.importance`` picks the estimator
(``"uniform"`` means no estimator: no scores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ecoflap_pl.pruning.fast_zeroth_order import fast_zeroth_order_sums
from ecoflap_pl.pruning.first_order import first_order_sums, gradient_norm_sums
from ecoflap_pl.pruning.loss import LossFn
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.registry import Registry
from ecoflap_pl.pruning.residency import Residency, resident
from ecoflap_pl.pruning.score_variants import get_score

if TYPE_CHECKING:
    from ecoflap_pl.pruning.config import PruningConfig


@dataclass(frozen=True)
class ImportanceRequest:
    """What an estimator reads.

    Attributes:
        model: the model, dense.
        params: candidate name -> weight, in forward order.
        groups: group -> its candidate names.
        batches: ``(global batch id, batch)`` pairs of this rank.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        config: the run's configuration (``score``, ``eps``, ``probes``, ``seed``, ``probe_granularity``...).
        monitor: counts the forward and backward passes.
        tick: ``tick(total)`` returns the callback to call as each of ``total`` units of work finishes (progress).
        progress: ``progress(done, total)``, for an estimator that counts its own work (``None``: no progress).
        residency: for a model with offloaded weights: ``params`` are then not readable between forward calls, and
            the estimator must hold each unit resident (``ecoflap_pl.pruning.residency``) while it reads or perturbs
            it. ``None``: every weight is resident.
    """

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    groups: Mapping[str, tuple[str, ...]]
    batches: Sequence[tuple[int, Any]]
    loss_fn: LossFn
    config: PruningConfig
    monitor: StageMonitor
    tick: Callable[[int], Callable[[], None]]
    progress: Callable[[int, int], None] | None
    residency: Residency | None = None


Measure = Callable[[ImportanceRequest], dict[str, float]]
Combine = Callable[[Mapping[str, float], ImportanceRequest, int], dict[str, float]]


@dataclass(frozen=True)
class ImportanceEstimator:
    """A registered estimator: ``measure`` (raw per-unit sums on this rank) and ``combine`` (global sums and the
    global number of coarse batches -> group -> score, before the ``sum``/``avg`` aggregation)."""

    name: str
    measure: Measure
    combine: Combine


_ESTIMATORS: Registry[ImportanceEstimator] = Registry(
    "An importance estimator named",
    "importance",
    "register an estimator with @register_importance(name, combine=...).",
    purpose=" to score groups",
)


def register_importance(name: str, *, combine: Combine) -> Callable[[Measure], Measure]:
    """Decorator registering ``measure(request) -> raw sums`` with its ``combine`` under ``name``."""

    def register(measure: Measure) -> Measure:
        if name == "uniform":  # taken by the config: it means "no scores"
            raise ValueError(f"{_ESTIMATORS.what} 'uniform' is already registered.")
        _ESTIMATORS.add(name, ImportanceEstimator(name, measure, combine))
        return measure

    return register


def importance_names() -> tuple[str, ...]:
    """The registered estimator names, in registration order (``"uniform"``, no scores, is not one)."""
    return _ESTIMATORS.names()


def get_importance(name: str) -> ImportanceEstimator:
    """The estimator registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return _ESTIMATORS.lookup(name)


def _unit_scalar_combine(raw: Mapping[str, float], request: ImportanceRequest, batch_count: int) -> dict[str, float]:
    """``from_scalar(mean_b s, weights)`` per unit (a group, or each tensor of it, summed); offloaded weights are
    read one group at a time, resident."""
    variant, residency, model = get_score(request.config.score), request.residency, request.model
    scores: dict[str, float] = {}
    for group, names in request.groups.items():
        offloaded = [n for n in names if residency is not None and residency.offloaded(n)]
        with resident(residency, offloaded, write_back=False):
            if request.config.probe_granularity == "per_block":
                scores[group] = variant.from_scalar(raw[group] / batch_count, [model.get_parameter(n) for n in names])
            else:
                scores[group] = sum(variant.from_scalar(raw[n] / batch_count, [model.get_parameter(n)]) for n in names)
    return scores


def _probe_units(request: ImportanceRequest) -> dict[str, list[str]]:
    """Unit -> its parameter names: each tensor alone (``per_tensor``) or the tensors of a group (``per_block``)."""
    if request.config.probe_granularity == "per_block":
        return {group: list(members) for group, members in request.groups.items()}
    return {name: [name] for name in request.params}


@register_importance("zeroth_order", combine=_unit_scalar_combine)
def zeroth_order_measure(request: ImportanceRequest) -> dict[str, float]:
    """Forward-only two-point estimates, per tensor or per group (``probe_granularity``), summed over batches:
    replays from the recorded dense block outputs, or full forwards per probe (``activation_storage: recompute``).

    A model with offloaded weights (``request.residency``) takes either path by parameter name, each unit's weights
    held resident while it is probed."""
    config = request.config
    return fast_zeroth_order_sums(
        request.model,
        _probe_units(request),
        request.batches,
        request.loss_fn,
        eps=config.eps,
        probes=config.probes,
        seed=config.seed,
        monitor=request.monitor,
        max_replicas=config.max_probe_replicas,
        storage=config.activation_storage,
        on_progress=request.progress,
        residency=request.residency,
    )


def _first_order_combine(raw: Mapping[str, float], request: ImportanceRequest, batch_count: int) -> dict[str, float]:
    """The group's tensor sums divided by the number of batches (the variant is applied per element)."""
    return {group: sum(raw[n] for n in names) / batch_count for group, names in request.groups.items()}


@register_importance("first_order", combine=_first_order_combine)
def first_order_measure(request: ImportanceRequest) -> dict[str, float]:
    """Streamed back-propagation, the score variant reduced per element, summed over batches."""
    return first_order_sums(
        request.model,
        request.params,
        request.batches,
        request.loss_fn,
        score=request.config.score,
        monitor=request.monitor,
        storage=request.config.activation_storage,
        on_batch_done=request.tick(len(request.batches)),
    )


@register_importance("gradient_norm", combine=_unit_scalar_combine)
def gradient_norm_measure(request: ImportanceRequest) -> dict[str, float]:
    """What ``zeroth_order`` estimates, computed exactly: per unit (``probe_granularity``) and batch
    ``sqrt(2/π)·‖∇_u L_b‖₂`` by streamed back-propagation, summed over batches; the score variants apply as for
    zeroth order. One backward per batch instead of two forwards per unit and probe, no sampling noise, but the
    memory of a backward pass (``activation_storage: recompute`` checkpoints every block)."""
    return gradient_norm_sums(
        request.model,
        _probe_units(request),
        request.params,
        request.batches,
        request.loss_fn,
        monitor=request.monitor,
        storage=request.config.activation_storage,
        on_batch_done=request.tick(len(request.batches)),
    )
