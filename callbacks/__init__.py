"""Lightning callbacks of ecoflap-pl (installed as ``ecoflap_pl.callbacks``)."""

from ecoflap_pl.callbacks.export import save_pruned_model
from ecoflap_pl.callbacks.pruning import ECoFLaPPruning

__all__ = ["ECoFLaPPruning", "save_pruned_model"]
