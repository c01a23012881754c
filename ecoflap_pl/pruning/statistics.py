"""Calibration statistics of Linear inputs, gathered by intercepting ``F.linear``.

A forward hook on an ``nn.Linear`` never fires when a model calls ``F.linear(x, self.qkv.weight, bias)``
itself (timm EVA/BEiT attention with separate q/v biases). Intercepting the functional call with a
``TorchFunctionMode`` sees both paths, keyed by the weight tensor's identity; weights that were never seen are
reported by name instead of being pruned with empty statistics.

Statistics are fp32 sums plus a count, so one ``all_reduce`` makes them global under DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class InputStatistics:
    """Running fp32 sums over the input rows ``x`` (shape ``[..., in_features]``) of one Linear layer.

    Args:
        in_features: the layer's input width.
        hessian: also accumulate ``Σ x xᵀ`` (``[in, in]``, SparseGPT); otherwise only ``Σ x_j²`` (Wanda).
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.column_sq_sums = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self.calls = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.column_sq_sums += rows.square().sum(dim=0)
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)
        self.calls += 1

    def all_reduce_(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics over every rank in place."""
        self.column_sq_sums.copy_(all_reduce(self.column_sq_sums))
        if self.gram is not None:
            self.gram.copy_(all_reduce(self.gram))


class LinearInputRecorder(TorchFunctionMode):
    """While active, feed the input of every ``F.linear`` call on a watched weight to its statistics."""

    def __init__(self, watched: dict[int, InputStatistics]) -> None:
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            statistics = self.watched.get(id(weight))
            if statistics is not None:
                statistics.add(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)
