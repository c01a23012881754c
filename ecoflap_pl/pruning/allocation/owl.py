"""OWL: outlier-weighted layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024).

Per block, with the dense model's Wanda metric ``A = |W|·‖X‖`` over all its candidate weights, the outlier ratio is
the share of entries with ``A > M · mean(A)`` (the mean over the whole block, as the reference code luuyin/OWL
takes it). A group's ratio ``D_g`` is its outlier entries over its parameters. More outliers -> lower sparsity:
``D`` is mapped linearly onto ``[p − λ, p + λ]`` (the most outliers at ``p − λ``), then shifted by one constant so
that the size-weighted budget ``Σ N_g s_g = p · N`` holds, each group clipped to the band. With equal group sizes
and no clipping this is the reference's rule (keep ratios ``2λ·(D − min D)/(max D − min D)``, shifted to mean
``1 − p``); the reference takes an unweighted mean because LLaMA blocks are equal, and can leave the band.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.allocation.budget import round_to_total
from ecoflap_pl.pruning.allocation.registry import Allocation, AllocationRequest, register_allocation
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.discovery import Candidate, Stack
from ecoflap_pl.pruning.fine import AllReduce, fine_prune_
from ecoflap_pl.pruning.loss import LossFn
from ecoflap_pl.pruning.masks import wanda_scores
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.statistics import InputStatistics
from ecoflap_pl.pruning.transaction import WeightTransaction

_BISECTION_STEPS = 200


def outlier_counts(
    weights: Mapping[str, torch.Tensor], statistics: Mapping[str, InputStatistics], m: float
) -> dict[str, int]:
    """Per weight of one block: its entries with ``A = |W|·‖X‖ > m · mean(A)``, the mean over every weight given.

    Args:
        weights: name -> ``[out, in]`` weight of the block.
        statistics: name -> its input statistics (``Σ x_j²`` per input column).
        m: the outlier multiple ``M``.
    """
    metrics = {name: wanda_scores(weight, statistics[name].column_sq_sums) for name, weight in weights.items()}
    total = sum(float(metric.double().sum()) for metric in metrics.values())
    threshold = m * total / sum(metric.numel() for metric in metrics.values())
    return {name: int((metric > threshold).sum()) for name, metric in metrics.items()}


def dense_outlier_ratios(
    model: nn.Module,
    stacks: Sequence[Stack],
    candidates: Sequence[Candidate],
    groups: Mapping[str, tuple[str, ...]],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    config: PruningConfig,
    m: float,
    *,
    monitor: StageMonitor,
    all_reduce: AllReduce | None = None,
) -> dict[str, float]:
    """Group -> outlier ratio ``D_g`` of the dense model, from one pass of the fine step that prunes nothing.

    The fine step's machinery records each block's calls and its Linear inputs; every block sees the dense
    outputs of the blocks before it.
    """
    counts: dict[str, int] = {}
    fine_prune_(
        model,
        stacks,
        candidates,
        {},
        batches,
        loss_fn,
        replace(config, method="wanda"),
        transaction=WeightTransaction(),
        monitor=monitor,
        all_reduce=all_reduce,
        observe=lambda weights, statistics: counts.update(outlier_counts(weights, statistics, m)),
    )
    numel = {c.name: c.numel for c in candidates}
    return {group: sum(counts[n] for n in names) / sum(numel[n] for n in names) for group, names in groups.items()}


def owl_sparsity(
    ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, spread: float
) -> dict[str, float]:
    """Per-group sparsity from outlier ratios, in ``[p − λ, p + λ]`` with an exact size-weighted budget.

    ``s_g = clip(p + λ − 2λ·(D_g − min D)/(max D − min D) + δ, p − λ, p + λ)`` with the one shift ``δ`` (found by
    bisection: the clipped sum is monotone in ``δ``) that gives ``Σ N_g s_g = p · N``; keeps are then rounded to
    integers by largest remainder so that ``Σ keep_g = round(N · (1 − p))`` exactly (a group may leave the band by
    less than one weight). Equal ratios, or ``λ = 0``, give every group ``p``.

    Args:
        ratios: group -> outlier ratio ``D_g``.
        sizes: group -> parameter count ``N_g``.
        sparsity: the target ``p``.
        spread: the half-width ``λ`` of the band.
    """
    low, high = max(sparsity - spread, 0.0), sparsity + spread
    least, most = min(ratios.values()), max(ratios.values())
    if most == least or spread == 0:
        raw = dict.fromkeys(ratios, sparsity)
    else:
        start = {g: sparsity + spread - 2 * spread * (d - least) / (most - least) for g, d in ratios.items()}
        total = sum(sizes.values())

        def pruned(shift: float) -> float:
            return sum(sizes[g] * min(max(s + shift, low), high) for g, s in start.items()) / total

        below, above = -2 * spread, 2 * spread
        for _ in range(_BISECTION_STEPS):
            middle = (below + above) / 2
            below, above = (middle, above) if pruned(middle) < sparsity else (below, middle)
        raw = {g: min(max(s + (below + above) / 2, low), high) for g, s in start.items()}
    keep = round_to_total(
        {g: sizes[g] * (1 - s) for g, s in raw.items()}, round(sum(sizes.values()) * (1 - sparsity)), dict(sizes)
    )
    return {g: 1 - keep[g] / sizes[g] for g in ratios}


@register_allocation("owl", reads_scores=False)
def owl_allocation(request: AllocationRequest) -> Allocation:
    """OWL with ``M = owl_m`` and ``λ = owl_lambda``, the budget over the whole model or inside each tower
    (``prune_per_model``). Forward only: one dense pass of the fine step's statistics."""
    config = request.config
    ratios = request.outlier_ratios(config.owl_m)
    parts = request.towers.values() if config.prune_per_model else [tuple(request.groups)]
    sparsity: dict[str, float] = {}
    for groups in parts:
        sparsity.update(
            owl_sparsity(
                {g: ratios[g] for g in groups},
                {g: request.sizes[g] for g in groups},
                config.sparsity,
                config.owl_lambda,
            )
        )
    return Allocation(sparsity)
