"""ecoflap-pl: ECoFLaP coarse-to-fine layer-wise pruning of vision-language models with PyTorch Lightning.

The engine's names below are imported on first use (PEP 562 ``__getattr__``; seven names do not need a lazy-loading
library): importing the package alone loads no torch, so the ``ecoflap`` command's entry point
(:mod:`ecoflap_pl.entry_point`) starts at once and handles a Ctrl+C during its slow imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("ecoflap_pl.pruning"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
