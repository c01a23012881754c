"""The exact reference the coarse step's block scores are ranked against, and the rank correlation itself.

The per-tensor zeroth-order probe estimates ``|zᵀ∇_W L_b|`` with ``z ~ N(0, I)``, whose mean is
``sqrt(2/π)·‖∇_W L_b‖₂``: the exact counterpart of a block's score is ``Σ_batches Σ_tensors ‖∇_W L_b‖₂``, taken by
plain autograd here, one batch at a time. Used by ``coarse_cost.py`` (CPU) and ``full_size.py`` (GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics.functional import spearman_corrcoef


def exact_gradient_norms(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    names: Iterable[str],
) -> list[dict[str, float]]:
    """``norms[batch][name]``: the exact ``‖∇_W L_b‖₂`` of the parameters ``names`` on every batch, by autograd.

    The gradients are dropped again (``set_to_none``), so the model leaves as it came; on a GPU the caching allocator
    is emptied as well, so that what is measured next sees the free memory it would have seen without this.
    """
    parameters = dict(model.named_parameters())
    names = list(names)
    norms = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        norms.append({name: float(parameters[name].grad.double().norm()) for name in names})
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return norms


def block_reference(norms: Sequence[Mapping[str, float]], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``Σ_batches Σ_tensors ‖∇_W L_b‖₂`` of every group (block), from :func:`exact_gradient_norms`."""
    return {group: sum(batch[name] for batch in norms for name in names) for group, names in groups.items()}


def spearman(values: Sequence[float], reference: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (tied values share their mean rank)."""
    return float(
        spearman_corrcoef(torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64))
    )


def group_spearman(scores: Mapping[str, float], reference: Mapping[str, float], groups: Iterable[str]) -> float:
    """:func:`spearman` of ``scores`` against ``reference`` over ``groups``."""
    groups = list(groups)
    return spearman([scores[g] for g in groups], [reference[g] for g in groups])
