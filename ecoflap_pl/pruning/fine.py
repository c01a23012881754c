"""The fine step: layer-wise pruning, block by block, each block seeing its pruned predecessors' outputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from ecoflap_pl.pruning.calls import BlockCall, capture_block_calls
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.discovery import Candidate, Stack
from ecoflap_pl.pruning.loss import LossFn, run_on_batch
from ecoflap_pl.pruning.methods import get_method
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.statistics import InputStatistics, LinearInputRecorder
from ecoflap_pl.pruning.transaction import WeightTransaction

logger = logging.getLogger(__name__)
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _block_statistics(
    block: nn.Module,
    block_name: str,
    weights: Mapping[str, nn.Parameter],
    calls: Sequence[BlockCall],
    hidden: Sequence[torch.Tensor],
    batch_ids: Sequence[int],
    hessian: bool,
    monitor: StageMonitor,
) -> dict[str, InputStatistics]:
    """Run ``block`` on every recorded call while recording the inputs of its candidate weights.

    Raises:
        FloatingPointError: when a weight's inputs are not finite, naming the calibration batch.
        RuntimeError: when a candidate weight was never used in an ``F.linear`` call.
    """
    statistics = {
        name: InputStatistics(weight.shape[1], weight.device, hessian=hessian) for name, weight in weights.items()
    }
    with LinearInputRecorder({id(weights[name]): stats for name, stats in statistics.items()}):
        for batch_id, call, state in zip(batch_ids, calls, hidden, strict=True):
            call.replay(block, state)
            monitor.block_forwards += 1
            broken = [name for name, stats in statistics.items() if not bool(stats.column_sq_sums.isfinite().all())]
            if broken:
                raise FloatingPointError(
                    f"The inputs of {broken} in block {block_name!r} are not finite on calibration batch {batch_id}. "
                    "The model was left unchanged. HINT: check that batch's inputs, or run the model in fp32."
                )
    silent = [name for name, stats in statistics.items() if stats.calls == 0]
    if silent:
        raise RuntimeError(
            f"Block {block_name!r} ran, but these weights were never used in an F.linear call, so their inputs "
            f"cannot be measured: {silent}. HINT: add them to `exclude`, or use method='magnitude'."
        )
    return statistics


def fine_prune_(
    model: nn.Module,
    stacks: Sequence[Stack],
    candidates: Sequence[Candidate],
    tensor_sparsity: Mapping[str, float],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    config: PruningConfig,
    *,
    transaction: WeightTransaction,
    monitor: StageMonitor,
    all_reduce: AllReduce | None = None,
    on_block_done: Callable[[], None] | None = None,
    observe: Callable[[Mapping[str, nn.Parameter], Mapping[str, InputStatistics]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every candidate at its sparsity, stack by stack in forward order; return the masks.

    For each stack, one forward per batch (stopped after the stack's last block starts) records every block's
    arguments with the already-pruned upstream stacks in place. Then, block by block: run the block on its
    recorded arguments with the propagated hidden stream while collecting input statistics of its Linear weights
    (summed over ranks with ``all_reduce``), prune them, and re-run the pruned block to produce the next block's
    hidden stream.

    Args:
        tensor_sparsity: parameter name -> sparsity; a candidate missing here is measured but left dense.
        batches: ``(global batch id, batch)`` pairs of this rank.
        observe: called for every block with its candidate weights and their input statistics (summed over ranks),
            before the block is pruned (the dense Wanda pass of the OWL allocation).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    by_block: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_block.setdefault(candidate.block, []).append(candidate)
    masks: dict[str, torch.Tensor] = {}
    method = get_method(config.method)
    needs_inputs = method.needs_inputs
    batch_ids = {id(batch): batch_id for batch_id, batch in batches}

    for stack in stacks:
        blocks = [modules[name] for name in stack.blocks]
        if needs_inputs:
            calls = capture_block_calls(
                blocks,
                [batch for _, batch in batches],
                lambda batch: run_on_batch(partial(loss_fn, model), batch, batch_ids[id(batch)]),
                calls_per_forward=stack.calls_per_forward,
            )
            monitor.full_forwards += len(batches)
            hidden = [cast(torch.Tensor, call.hidden) for call in calls[0]]  # block 0's hidden stream is kept
            call_batch_ids = [batch_id for batch_id, _ in batches for _ in range(stack.calls_per_forward)]
        for index, (block_name, block) in enumerate(zip(stack.blocks, blocks, strict=True)):
            block_candidates = by_block.get(block_name, [])
            weights = {c.name: params[c.name] for c in block_candidates}
            statistics: dict[str, InputStatistics] = {}
            if needs_inputs and weights:
                statistics = _block_statistics(
                    block,
                    block_name,
                    weights,
                    calls[index],
                    hidden,
                    call_batch_ids,
                    method.inputs == "gram",
                    monitor,
                )
                if all_reduce is not None:
                    for stats in statistics.values():
                        stats.all_reduce_(all_reduce)
            if observe is not None:
                observe(weights, statistics)
            for name, weight in weights.items():
                if name not in tensor_sparsity:
                    continue
                transaction.save(weight)
                masks[name] = method.prune(weight, statistics.get(name), tensor_sparsity[name], config)
            del statistics
            if needs_inputs and index + 1 < len(blocks):
                hidden = [call.replay(block, state) for call, state in zip(calls[index], hidden, strict=True)]
                monitor.block_forwards += len(hidden)
            if needs_inputs:
                calls[index] = []  # free this block's recorded arguments as soon as they are used
            if on_block_done is not None:
                on_block_done()
        logger.debug("Pruned stack %s (%d blocks)", stack.name, len(blocks))
    return masks
