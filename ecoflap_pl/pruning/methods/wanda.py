"""Wanda: ``|W_ij| · ‖X_j‖₂`` scores, ranked per output row by default (docs/algorithm.md §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ecoflap_pl.pruning.masks import apply_mask_, select_mask, wanda_scores
from ecoflap_pl.pruning.methods.registry import register_method

if TYPE_CHECKING:
    from ecoflap_pl.pruning.config import PruningConfig
    from ecoflap_pl.pruning.statistics import InputStatistics


@register_method("wanda", inputs="column_norms", default_comparison="per_row")
def wanda_prune_(
    weight: torch.Tensor, statistics: InputStatistics | None, sparsity: float, config: PruningConfig
) -> torch.Tensor:
    """Zero the lowest Wanda scores of ``weight`` (``[out, in]``) in place; return the mask."""
    if statistics is None:
        raise ValueError("Wanda needs the column norms of the weight's inputs, got no statistics.")
    mask = select_mask(
        wanda_scores(weight, statistics.column_sq_sums), sparsity, config.comparison or "per_row", config.n_m
    )
    apply_mask_(weight, mask)
    return mask
