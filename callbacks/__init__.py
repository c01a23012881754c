"""Lightning callbacks of ecoflap-pl (installed as ``ecoflap_pl.callbacks``)."""

from ecoflap_pl.callbacks.pruning import ECoFLaPPruning

__all__ = ["ECoFLaPPruning"]
