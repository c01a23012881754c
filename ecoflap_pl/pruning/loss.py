"""Evaluating the calibration loss with the checks every coarse estimator needs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def describe_batch(batch: Any) -> str:
    """The shapes of a batch's tensors, e.g. ``"pixel_values (2, 3, 32, 32), input_ids (2, 7)"``, for errors."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch) if isinstance(batch, list | tuple) else ()
    shapes = [f"{key} {tuple(value.shape)}" for key, value in items if isinstance(value, torch.Tensor)]
    return ", ".join(shapes) or type(batch).__name__


def run_on_batch(run: Callable[[Any], Any], batch: Any, batch_id: int) -> Any:
    """``run(batch)``, naming the calibration batch and its shapes when the forward pass fails (a shape mismatch)."""
    try:
        return run(batch)
    except torch.OutOfMemoryError:
        raise  # keeps its type: callers and users handle running out of memory on their own
    except RuntimeError as error:
        raise RuntimeError(
            f"The forward pass failed on calibration batch {batch_id} ({describe_batch(batch)}): {error} "
            "HINT: when only some batches fail, check that they are shaped like the others (same image size, padded "
            "text): the calibration data and the collator."
        ) from error


def _non_finite_parameter(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return name
    return None


def checked_loss(loss_fn: LossFn, model: nn.Module, batch: Any, batch_id: int) -> torch.Tensor:
    """``loss_fn(model, batch)`` as a scalar in at least fp32 (an fp64 loss keeps its precision).

    Raises:
        TypeError: when the loss is not a scalar tensor.
        RuntimeError: when the forward pass fails, naming the calibration batch and its shapes.
        FloatingPointError: when the loss is NaN or infinite, naming the calibration batch, or the weight that is
            already NaN or infinite.
    """
    loss = run_on_batch(lambda item: loss_fn(model, item), batch, batch_id)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}."
        )
    loss = loss.reshape(()).to(torch.promote_types(loss.dtype, torch.float32))
    value = float(loss.detach())
    if not math.isfinite(value):
        broken = _non_finite_parameter(model)
        if broken is not None:
            raise FloatingPointError(
                f"The calibration loss is {value} because the model's weight {broken!r} already holds NaN or "
                "infinite values. The model was left unchanged. HINT: the weights are corrupt (a diverged run or a "
                "damaged checkpoint); load good weights before pruning."
            )
        raise FloatingPointError(
            f"The calibration loss is {value} on calibration batch {batch_id}. The model was left unchanged. "
            "HINT: check that batch's inputs and labels, or run the model in fp32."
        )
    return loss
