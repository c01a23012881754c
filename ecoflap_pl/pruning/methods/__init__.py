"""Fine-step methods: layer-wise pruners chosen by ``PruningConfig.method``.

Importing the package registers the built-in methods: ``wanda``, ``sparsegpt`` and ``magnitude``. A new method is one
function decorated with :func:`register_method` (docs/extending.md).
"""

# isort: off
# Importing a method's module registers it; this order (Wanda, SparseGPT, magnitude) is the order errors list.
from ecoflap_pl.pruning.methods.wanda import wanda_prune_
from ecoflap_pl.pruning.methods.sparsegpt import sparsegpt_method_prune_
from ecoflap_pl.pruning.methods.magnitude import magnitude_prune_

# isort: on
from ecoflap_pl.pruning.methods.registry import (
    FineMethod,
    MethodInputs,
    PruneFn,
    get_method,
    method_names,
    register_method,
)

__all__ = [
    "FineMethod",
    "MethodInputs",
    "PruneFn",
    "get_method",
    "magnitude_prune_",
    "method_names",
    "register_method",
    "sparsegpt_method_prune_",
    "wanda_prune_",
]
