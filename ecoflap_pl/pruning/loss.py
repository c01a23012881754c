"""Evaluating the calibration loss with the checks every coarse estimator needs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def checked_loss(loss_fn: LossFn, model: nn.Module, batch: Any, batch_id: int) -> torch.Tensor:
    """``loss_fn(model, batch)`` as a scalar in at least fp32 (an fp64 loss keeps its precision).

    Raises:
        TypeError: when the loss is not a scalar tensor.
        FloatingPointError: when the loss is NaN or infinite, naming the calibration batch.
    """
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}."
        )
    loss = loss.reshape(()).to(torch.promote_types(loss.dtype, torch.float32))
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"The calibration loss is {value} on calibration batch {batch_id}. The model was left unchanged. "
            "HINT: check that batch's inputs and labels, or run the model in fp32."
        )
    return loss
