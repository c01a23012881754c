"""The uniform baseline: every group gets the target sparsity (no coarse step)."""

from __future__ import annotations

from ecoflap_pl.pruning.allocation.registry import Allocation, AllocationRequest, register_allocation


@register_allocation("uniform", reads_scores=False)
def uniform_allocation(request: AllocationRequest) -> Allocation:
    """Every group at ``sparsity``; each tensor then loses exactly ``round(numel · sparsity)``."""
    return Allocation(dict.fromkeys(request.groups, request.config.sparsity))
