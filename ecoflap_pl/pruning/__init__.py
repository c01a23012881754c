"""The ECoFLaP pruning engine: pure PyTorch, no Lightning (see docs/algorithm.md)."""

from ecoflap_pl.pruning.allocation import allocate_sparsity
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.monitor import StageStats
from ecoflap_pl.pruning.pipeline import check_before_pruning, check_calibration_sizes, prune, score_groups
from ecoflap_pl.pruning.result import GroupScores, PruningResult

__all__ = [
    "GroupScores",
    "PruningConfig",
    "PruningResult",
    "StageStats",
    "allocate_sparsity",
    "check_before_pruning",
    "check_calibration_sizes",
    "prune",
    "score_groups",
]
