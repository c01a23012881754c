"""``auto``: try several allocations and keep the one with the lowest loss on held-out calibration batches.

The candidates are the uniform baseline, the paper's rule (ECoFLaP) at several caps and OWL at several band widths,
each with the configured values among them. Every candidate is pruned with the fine step (Wanda standing in for
SparseGPT, which is much slower), its loss measured on calibration batches that neither the scores nor the fine
step saw, and the model restored; the run then prunes for real with the winner. Uniform is tried first and wins
ties, so ``auto`` is never worse than uniform on that held-out loss.
"""

from __future__ import annotations

import logging

from ecoflap_pl.pruning.allocation.registry import (
    Allocation,
    AllocationRequest,
    CandidateAllocation,
    get_allocation,
    register_allocation,
)

logger = logging.getLogger(__name__)

CAP_STEPS = (0.05, 0.1, 0.2)
"""``max_sparsity`` candidates of the paper's rule: ``sparsity`` plus each step (the paper uses + 0.1)."""
OWL_LAMBDAS = (0.04, 0.08, 0.12)
"""``owl_lambda`` candidates (the OWL paper uses 0.08 at 70%)."""
_MAX_CAP = 0.99


def _candidates(request: AllocationRequest) -> list[tuple[str, dict[str, float]]]:
    config = request.config
    sparsity = config.sparsity
    named = [("uniform", get_allocation("uniform")(request).group_sparsity)]
    if config.importance != "uniform":
        assert config.max_sparsity is not None
        caps = sorted({round(min(sparsity + step, _MAX_CAP), 6) for step in CAP_STEPS} | {config.max_sparsity})
        for cap in caps:
            allocation = get_allocation("ecoflap")(request.with_config(allocation="ecoflap", max_sparsity=cap))
            named.append((f"ecoflap(max_sparsity={cap:g})", allocation.group_sparsity))
    for spread in sorted({*OWL_LAMBDAS, config.owl_lambda}):
        if spread > 0 and sparsity + spread < 1:
            allocation = get_allocation("owl")(request.with_config(allocation="owl", owl_lambda=spread))
            named.append((f"owl(lambda={spread:g})", allocation.group_sparsity))
    return named


@register_allocation("auto")
def auto_allocation(request: AllocationRequest) -> Allocation:
    """Evaluate every candidate (:func:`_candidates`; identical allocations are evaluated once) with
    ``request.evaluate`` and return the one with the lowest held-out loss, the first on ties."""
    tried: list[CandidateAllocation] = []
    losses: dict[tuple[tuple[str, float], ...], float] = {}
    for name, sparsity in _candidates(request):
        key = tuple(sorted(sparsity.items()))
        if key not in losses:
            losses[key] = request.evaluate(name, sparsity)
        tried.append(CandidateAllocation(name, sparsity, losses[key]))
        logger.info("auto: candidate %s, held-out loss %.6g", name, losses[key])
    best = min(tried, key=lambda candidate: candidate.heldout_loss)
    logger.info("auto: chose %s (held-out loss %.6g)", best.name, best.heldout_loss)
    return Allocation(dict(best.group_sparsity), tuple(tried), best.name)
