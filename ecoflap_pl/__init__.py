"""ecoflap-pl: ECoFLaP coarse-to-fine layer-wise pruning of vision-language models with PyTorch Lightning."""

from ecoflap_pl.pruning import (
    GroupScores,
    PruningConfig,
    PruningResult,
    StageStats,
    allocate_sparsity,
    prune,
    score_groups,
)

__all__ = ["GroupScores", "PruningConfig", "PruningResult", "StageStats", "allocate_sparsity", "prune", "score_groups"]
__version__ = "0.1.0"
