"""Evaluating the calibration loss with the checks every coarse estimator needs."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _named_tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a batch with their keys (a tensor alone is ``"tensor"``): those of a mapping (a dict, a
    tokenizer's ``BatchEncoding``), a list or a tuple."""
    if isinstance(batch, torch.Tensor):
        return [("tensor", batch)]
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch) if isinstance(batch, list | tuple) else ()
    return [(str(key), value) for key, value in items if isinstance(value, torch.Tensor)]


def describe_batch(batch: Any) -> str:
    """The shapes of a batch's tensors, e.g. ``"pixel_values (2, 3, 32, 32), input_ids (2, 7)"``, for errors."""
    shapes = [f"{key} {tuple(value.shape)}" for key, value in _named_tensors(batch)]
    return ", ".join(shapes) or type(batch).__name__


def _failure_hint(model: nn.Module, batch: Any) -> str:
    """The likeliest cause of a failed forward pass: the batch's tensors on another device than the model's weights,
    or floating-point ones of another dtype (a model that does not cast its inputs), else a shape that differs from
    the other batches'."""
    tensors = _named_tensors(batch)
    devices = {param.device for param in model.parameters()}
    elsewhere = [f"{key} on {value.device}" for key, value in tensors if value.device not in devices]
    if elsewhere:
        return (
            f"HINT: the batch holds {', '.join(elsewhere)}, the model's weights are on "
            f"{', '.join(sorted(map(str, devices)))}: the calibration batches are used as given; move them to the "
            "model's device."
        )
    dtypes = {param.dtype for param in model.parameters() if param.is_floating_point()}
    other = [
        f"{key} {value.dtype}" for key, value in tensors if value.is_floating_point() and value.dtype not in dtypes
    ]
    if other:
        return (
            f"HINT: the batch holds {', '.join(other)}, the model's weights are "
            f"{', '.join(sorted(str(dtype) for dtype in dtypes))}: cast them to the model's dtype, in the batches or "
            "in `loss_fn`."
        )
    return (
        "HINT: when only some batches fail, check that they are shaped like the others (same image size, padded "
        "text): the calibration data and the collator."
    )


def _own_copy(batch: Any) -> Any:
    """``batch`` with its outer container copied (a dict, a tokenizer's ``BatchEncoding``, a list): a ``loss_fn`` that
    pops from it (``labels = batch.pop("labels")``, the Hugging Face Trainer's ``compute_loss`` recipe) takes them from
    this call's copy, not from the calibration batch that every later pass reads again."""
    return copy.copy(batch) if isinstance(batch, Mapping | list) else batch


def run_on_batch(loss_fn: LossFn, model: nn.Module, batch: Any, batch_id: int) -> Any:
    """``loss_fn(model, batch)`` on a copy of the batch's container, naming the calibration batch, its shapes and the
    likely cause when the forward pass fails (tensors on another device or of another dtype than the model's weights,
    a shape mismatch)."""
    try:
        return loss_fn(model, _own_copy(batch))
    except torch.OutOfMemoryError:
        raise  # keeps its type: callers and users handle running out of memory on their own
    except RuntimeError as error:
        raise RuntimeError(
            f"The forward pass failed on calibration batch {batch_id} ({describe_batch(batch)}): {error} "
            f"{_failure_hint(model, batch)}"
        ) from error


def _non_finite_parameter(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return name
    return None


def _loss_hint(returned: Any) -> str:
    """A hint for a ``loss_fn`` that returned a Hugging Face model's whole output instead of its loss (return
    ``.loss``), or a loss that is ``None`` (the model computes none without labels: pass them)."""
    if returned is None or getattr(returned, "loss", 0) is None:
        return (
            " HINT: a Hugging Face model's loss is None without labels: pass the labels it computes its loss from, "
            "e.g. `model(**batch, labels=batch['input_ids']).loss` for a language model (or `return` the loss)."
        )
    if hasattr(returned, "loss"):
        return " HINT: return the output's loss, `model(**batch).loss`."
    return ""


def checked_loss(loss_fn: LossFn, model: nn.Module, batch: Any, batch_id: int) -> torch.Tensor:
    """``loss_fn(model, batch)`` as a scalar in at least fp32 (an fp64 loss keeps its precision).

    Raises:
        TypeError: when the loss is not a scalar tensor.
        RuntimeError: when the forward pass fails, naming the calibration batch and its shapes.
        FloatingPointError: when the loss is NaN or infinite, naming the calibration batch, or the weight that is
            already NaN or infinite.
    """
    loss = run_on_batch(loss_fn, model, batch, batch_id)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}.{_loss_hint(loss)}"
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
