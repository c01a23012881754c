"""Keeping pruning masks fixed: zero the gradients and the weights of pruned entries.

Masks are ``{parameter name: bool tensor}`` with ``True`` = kept, names relative to the pruned module. Each mask is
moved to its weight's device the first time it is used there and kept there, so the per-step cost is one
``masked_fill_`` per tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import nn


def masked_parameters(
    module: nn.Module, masks: MutableMapping[str, torch.Tensor]
) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, mask on the parameter's device)`` for every mask.

    Raises:
        ValueError: when a mask names no parameter of ``module`` or does not match its shape (masks from another
            model).
    """
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        param = params.get(name)
        if param is None or param.shape != mask.shape:
            found = "no such parameter" if param is None else f"parameter shape {tuple(param.shape)}"
            raise ValueError(
                f"Pruning mask {name!r} of shape {tuple(mask.shape)} does not fit the model ({found}). "
                "HINT: the checkpoint's masks belong to another model; resume with the model that was pruned."
            )
        if mask.device != param.device:
            mask = masks[name] = mask.to(param.device)
        yield param, mask


@torch.no_grad()
def mask_weights_(module: nn.Module, masks: MutableMapping[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place."""
    for param, mask in masked_parameters(module, masks):
        param.masked_fill_(~mask, 0)


@torch.no_grad()
def mask_gradients_(module: nn.Module, masks: MutableMapping[str, torch.Tensor]) -> None:
    """Zero the gradient of every pruned weight in place (parameters without a gradient are skipped)."""
    for param, mask in masked_parameters(module, masks):
        if param.grad is not None:
            param.grad.masked_fill_(~mask, 0)
