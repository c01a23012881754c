"""The exact reference the coarse step's block scores are ranked against, and the rank correlation itself.

The per-tensor zeroth-order probe estimates ``|zᵀ∇_W L_b|`` with ``z ~ N(0, I)``, whose mean is
``sqrt(2/π)·‖∇_W L_b‖₂``: the exact counterpart of a block's score is ``Σ_batches Σ_tensors ‖∇_W L_b‖₂``, taken by
plain autograd here, one batch at a time. Used by ``coarse_cost.py`` (CPU), ``zo_quality.py`` (Gemma-3-270M,
CPU) and ``full_size.py`` (GPU). :func:`simulated_spearman` gives the Spearman ρ the zeroth-order estimator
reaches in expectation, from those exact norms alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
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


def simulated_spearman(
    norms: list[dict[str, float]],
    groups: dict[str, list[str]],
    probes: int,
    batches: int,
    per_block: bool = False,
    draws: int = 200,
) -> tuple[float, float]:
    """Mean and 10th percentile over ``draws`` of the Spearman ρ between the zeroth-order block scores with ``probes``
    Gaussian directions per batch on the first ``batches`` batches and the exact ``Σ_b Σ_W ‖∇_W L_b‖₂``.

    For ``z ~ N(0, I)``, ``zᵀg ~ N(0, ‖g‖²)`` exactly, so a two-point probe's ``|ĝ|`` is ``‖g‖·|N(0, 1)|`` up to the
    finite difference's O(ε²) error and the loss's rounding: the estimator's distribution follows from the exact
    norms alone. ``per_block`` draws one direction for a whole block (``‖g_block‖ = sqrt(Σ_W ‖∇_W L‖²)``).
    """
    generator = np.random.default_rng(0)
    names = sorted(groups)
    exact = np.array([[[norms[b][t] for t in groups[g]] for g in names] for b in range(batches)], dtype=object)
    reference = np.array([sum(sum(exact[b][i]) for b in range(batches)) for i in range(len(names))])
    units = [
        [np.sqrt(np.sum(np.square(exact[b][i]))) if per_block else np.asarray(exact[b][i]) for i in range(len(names))]
        for b in range(batches)
    ]
    values = []
    for _ in range(draws):
        scores = np.zeros(len(names))
        for b in range(batches):
            for i in range(len(names)):
                magnitude = np.abs(generator.standard_normal((probes, np.size(units[b][i])))).mean(axis=0)
                scores[i] += float(np.sum(units[b][i] * magnitude))
        values.append(spearman(list(scores), list(reference)))
    return float(np.mean(values)), float(np.percentile(values, 10))
