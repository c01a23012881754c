"""Weight perturbations applied to Linear outputs, one per replica of the calibration batch.

A probe evaluates the loss at ``W ± εZ``. Instead of writing ``W ± εZ`` into the weight (which rounds in
bf16/fp16 and must be undone), ``F.linear`` calls on a perturbed weight are intercepted and return
``x·Wᵀ + b ± ε·x·Zᵀ``, the same value in exact arithmetic. When a forward carries several copies (replicas) of the
batch stacked along the leading dimension, each replica's rows get their own ``(Z, sign)``, so the ± pair of one
direction and the probes of several weights share one forward. Intercepting the functional call (as the
statistics of the fine step do) also sees weights that a model passes to ``F.linear`` itself (timm EVA's fused
qkv).

The replicas must be the outermost dimension of every Linear input (``[replicas·batch, ...]``): true for models
that keep the batch dimension first, which every supported family does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ecoflap_pl.pruning.block_outputs import NotReplicable


@dataclass(frozen=True)
class Replica:
    """One replica's perturbation: ``sign·ε·direction`` added to each listed weight."""

    weights: tuple[torch.Tensor, ...]
    directions: tuple[torch.Tensor, ...]
    sign: float


class LinearPerturbation(TorchFunctionMode):
    """While active, ``F.linear`` on a perturbed weight adds ``sign·ε·x·Zᵀ`` to the rows of each replica.

    Args:
        replicas: one perturbation per replica, in replica order along the leading dimension.
        eps: perturbation size ε.
    """

    def __init__(self, replicas: Sequence[Replica], eps: float) -> None:
        super().__init__()
        self.count = len(replicas)
        self.eps = eps
        self.by_weight: dict[int, list[tuple[int, float, torch.Tensor]]] = {}
        self.names: dict[int, torch.Tensor] = {}
        for index, replica in enumerate(replicas):
            for weight, direction in zip(replica.weights, replica.directions, strict=True):
                self.by_weight.setdefault(id(weight), []).append((index, replica.sign, direction))
                self.names[id(weight)] = weight
        self.seen: set[int] = set()
        self.elsewhere: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is not F.linear:
            if isinstance(output, torch.Tensor):  # a computation with the weight, not a look at its dtype or shape
                self.elsewhere.update(id(v) for v in (*args, *kwargs.values()) if id(v) in self.by_weight)
            return output
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        entries = self.by_weight.get(id(weight))
        if not entries:
            return output
        inputs = args[0] if args else kwargs["input"]
        if inputs.ndim == 0 or inputs.shape[0] % self.count:
            raise NotReplicable(f"a Linear input of shape {tuple(inputs.shape)} does not hold {self.count} replicas")
        size = inputs.shape[0] // self.count
        for index, sign, direction in entries:
            rows = slice(index * size, (index + 1) * size)
            output[rows] += (sign * self.eps) * F.linear(inputs[rows], direction)
        self.seen.add(id(weight))
        return output

    def unperturbed(self) -> list[torch.Tensor]:
        """The perturbed weights that no ``F.linear`` call used, or that another operation used as well: their
        perturbation did not reach every use."""
        return [weight for key, weight in self.names.items() if key not in self.seen or key in self.elsewhere]
