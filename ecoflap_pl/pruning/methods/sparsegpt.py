"""SparseGPT: OBS-style pruning that reconstructs the kept weights from the inputs' Gram matrix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ecoflap_pl.pruning.methods.registry import register_method
from ecoflap_pl.pruning.sparsegpt import sparsegpt_prune_

if TYPE_CHECKING:
    from ecoflap_pl.pruning.config import PruningConfig
    from ecoflap_pl.pruning.statistics import InputStatistics


@register_method("sparsegpt", inputs="gram")
def sparsegpt_method_prune_(
    weight: torch.Tensor, statistics: InputStatistics | None, sparsity: float, config: PruningConfig
) -> torch.Tensor:
    """Prune ``weight`` in place with SparseGPT (``sparsegpt_block_size``, ``sparsegpt_damping``); return the mask."""
    if statistics is None or statistics.gram is None:
        raise ValueError("SparseGPT needs the Gram matrix of the weight's inputs, got none.")
    return sparsegpt_prune_(
        weight,
        statistics.gram,
        sparsity,
        comparison=config.comparison or "per_matrix",
        n_m=config.n_m,
        block_size=config.sparsegpt_block_size,
        damping=config.sparsegpt_damping,
    )
