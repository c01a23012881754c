"""ECoFLaP's allocation (the paper's rule): group scores -> per-group sparsity under a global budget and a cap."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from ecoflap_pl.pruning.allocation.budget import round_to_total
from ecoflap_pl.pruning.allocation.registry import Allocation, AllocationRequest, register_allocation

logger = logging.getLogger(__name__)


def _validate(scores: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, max_sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
    if not sparsity <= max_sparsity < 1.0:
        raise ValueError(f"`max_sparsity` must be in [sparsity, 1) = [{sparsity}, 1), got {max_sparsity!r}.")
    if set(scores) != set(sizes):
        raise ValueError(
            f"`scores` and `sizes` must have the same groups; only in scores: {sorted(set(scores) - set(sizes))}, "
            f"only in sizes: {sorted(set(sizes) - set(scores))}."
        )
    if not sizes:
        raise ValueError("`sizes` must name at least one group, got {}.")
    for group, size in sizes.items():
        if int(size) != size or size <= 0:
            raise ValueError(f"`sizes[{group!r}]` must be a positive integer, got {size!r}.")
    for group, score in scores.items():
        if not (math.isfinite(score) and score >= 0):
            raise ValueError(f"`scores[{group!r}]` must be finite and >= 0, got {score!r}.")


def _water_fill(remaining: int, weights: dict[str, float], capacity: dict[str, int]) -> dict[str, float]:
    """Hand out ``remaining`` in proportion to ``weights``, saturating groups at ``capacity`` and re-spreading."""
    share = dict.fromkeys(capacity, 0.0)
    open_groups = {group for group, cap in capacity.items() if cap > 0}
    left = float(remaining)
    while left > 1e-9 and open_groups:
        total = sum(weights[group] for group in open_groups)
        # All-zero scores carry no preference: spread by what each group can still take (its size).
        basis = weights if total > 0 else {group: float(capacity[group]) for group in open_groups}
        total = sum(basis[group] for group in open_groups)
        saturated = {group for group in open_groups if share[group] + left * basis[group] / total >= capacity[group]}
        if not saturated:
            for group in open_groups:
                share[group] += left * basis[group] / total
            break
        for group in saturated:
            left -= capacity[group] - share[group]
            share[group] = float(capacity[group])
        open_groups -= saturated
    return share


def allocate_sparsity(
    scores: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, max_sparsity: float
) -> dict[str, float]:
    """Per-group sparsity from importance scores (docs/algorithm.md §2, Allocation), with an exact global budget.

    With ``N = Σ N_g`` parameters and ``K = round(N · (1 − sparsity))`` to keep, every group first keeps its floor
    ``ceil(N_g · (1 − max_sparsity))``; the rest of ``K`` is handed out in proportion to the scores ``S_g`` (not
    weighted by ``N_g``), a group saturating at ``N_g`` with its excess re-spread over the others; keeps are then
    rounded to integers by largest remainder so that ``Σ keep_g = K``. Away from saturation,
    ``sparsity_g ≈ s_max − (S_g / ΣS) · (s_max − p) · N / N_g``, so sparsity never increases with the score
    density ``S_g / N_g`` (with equal sizes: a higher score never gets a higher sparsity). All-zero scores spread
    the budget by size (uniform sparsity). The floors may exceed ``K`` by at most one parameter per group.

    Args:
        scores: group -> importance ``S_g >= 0``.
        sizes: group -> parameter count ``N_g``.
        sparsity: global target fraction of zeros ``p``.
        max_sparsity: cap ``s_max >= p`` on every group.

    Returns:
        group -> sparsity ``1 − keep_g / N_g``.
    """
    _validate(scores, sizes, sparsity, max_sparsity)
    sizes = {group: int(size) for group, size in sizes.items()}
    keep_target = round(sum(sizes.values()) * (1.0 - sparsity))
    floors = {group: min(size, math.ceil(size * (1.0 - max_sparsity) - 1e-9)) for group, size in sizes.items()}
    remaining = max(keep_target - sum(floors.values()), 0)
    capacity = {group: sizes[group] - floors[group] for group in sizes}
    share = _water_fill(remaining, {group: float(scores[group]) for group in sizes}, capacity)

    extra = round_to_total(share, remaining, capacity, tie_break=lambda group: scores[group] / sizes[group])
    return {group: 1.0 - (floors[group] + extra[group]) / sizes[group] for group in sizes}


@register_allocation("ecoflap")
def ecoflap_allocation(request: AllocationRequest) -> Allocation:
    """The paper's rule on the configured coarse scores (:func:`allocate_sparsity`), capped at ``max_sparsity``,
    the budget met over the whole model or inside each tower (``prune_per_model``)."""
    config = request.config
    scores = request.scores()
    if not any(scores.scores.values()):
        logger.warning(
            "Every group score is 0, so the ECoFLaP allocation is uniform: the calibration loss has no gradient at "
            "the dense model (e.g. a distillation loss to the dense model's own outputs). HINT: use the model's "
            "training loss, or allocation: owl / uniform."
        )
    assert config.max_sparsity is not None
    return Allocation(scores.allocate(config.sparsity, config.max_sparsity, config.prune_per_model))
