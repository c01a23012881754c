"""Magnitude pruning: ``|W_ij|`` scores, no calibration inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ecoflap_pl.pruning.masks import apply_mask_, magnitude_scores, select_mask
from ecoflap_pl.pruning.methods.registry import register_method

if TYPE_CHECKING:
    from ecoflap_pl.pruning.config import PruningConfig
    from ecoflap_pl.pruning.statistics import InputStatistics


@register_method("magnitude", inputs="none")
def magnitude_prune_(
    weight: torch.Tensor, statistics: InputStatistics | None, sparsity: float, config: PruningConfig
) -> torch.Tensor:
    """Zero the smallest-magnitude entries of ``weight`` in place; return the mask."""
    mask = select_mask(magnitude_scores(weight), sparsity, config.comparison or "per_row", config.n_m)
    apply_mask_(weight, mask)
    return mask
