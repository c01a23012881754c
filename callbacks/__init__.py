"""Lightning callbacks of ecoflap-pl (installed as ``ecoflap_pl.callbacks``)."""

from .export import save_pruned_model
from .pruning import ECoFLaPPruning

__all__ = ["ECoFLaPPruning", "save_pruned_model"]
