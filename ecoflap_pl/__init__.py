"""ecoflap-pl: ECoFLaP coarse-to-fine layer-wise pruning of vision-language models with PyTorch Lightning."""

__version__ = "0.1.0"
