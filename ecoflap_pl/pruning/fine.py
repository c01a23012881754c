"""The fine step: layer-wise pruning, block by block, each block seeing its pruned predecessors' outputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ecoflap_pl.pruning.block_outputs import map_tensors
from ecoflap_pl.pruning.calls import BlockCall, hidden_output, merge_calls
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.discovery import Candidate, Stack
from ecoflap_pl.pruning.loss import LossFn, run_on_batch
from ecoflap_pl.pruning.methods import get_method
from ecoflap_pl.pruning.monitor import StageMonitor, free_memory_bytes
from ecoflap_pl.pruning.residency import Residency, resident
from ecoflap_pl.pruning.stand_in import StackOutputs, capture_calls, split_output
from ecoflap_pl.pruning.statistics import InputStatistics, LinearInputRecorder
from ecoflap_pl.pruning.transaction import WeightTransaction

logger = logging.getLogger(__name__)
AllReduce = Callable[[torch.Tensor], torch.Tensor]


_ACTIVATION_BYTES_PER_HIDDEN_BYTE = 32  # a block's transient activations (attention scores, MLP) per hidden byte


@dataclass(frozen=True)
class _Replay:
    """One block replay covering consecutive recorded calls (several stacked calibration batches, or one)."""

    call: BlockCall
    hidden: torch.Tensor
    indices: range
    sizes: tuple[int, ...]

    def run(self, block: nn.Module, monitor: StageMonitor) -> list[Any]:
        """Replay the block; return what it returned for each covered call."""
        output = self.call.run(block, self.hidden)
        monitor.block_forwards += len(self.indices)
        return split_output(output, self.sizes) if len(self.indices) > 1 else [output]


def replays(calls: Sequence[BlockCall], hidden: Sequence[torch.Tensor], most: int) -> list[_Replay]:
    """The recorded calls in replays of up to ``most`` consecutive calls stacked along the batch dimension; calls
    that cannot be stacked with their neighbours are replayed alone."""
    found: list[_Replay] = []
    for start in range(0, len(calls), most):
        stop = min(start + most, len(calls))
        merged = merge_calls(calls[start:stop], hidden[start:stop])
        if merged is not None:
            sizes = tuple(int(state.shape[0]) for state in hidden[start:stop])
            found.append(_Replay(merged[0], merged[1], range(start, stop), sizes))
        else:
            found.extend(
                _Replay(calls[i], hidden[i], range(i, i + 1), (int(hidden[i].shape[0]),)) for i in range(start, stop)
            )
    return found


def replay_batches(most: int, hidden: Sequence[torch.Tensor], device: torch.device) -> int:
    """Calibration batches per block replay: at most ``most``, and a quarter of the free memory at most."""
    per_call = max(1, max(state.numel() * state.element_size() for state in hidden))
    fits = int(free_memory_bytes(device) // 4 // (per_call * _ACTIVATION_BYTES_PER_HIDDEN_BYTE))
    return max(1, min(most, fits, len(hidden)))


def _stored(value: Any, storage: torch.device | None) -> Any:
    return value if storage is None else map_tensors(value, lambda t: t.to(storage))


def _block_statistics(
    block: nn.Module,
    block_name: str,
    weights: Mapping[str, nn.Parameter],
    calls: Sequence[BlockCall],
    hidden: Sequence[torch.Tensor],
    batch_ids: Sequence[int],
    hessian: bool,
    monitor: StageMonitor,
    most: int,
) -> dict[str, InputStatistics]:
    """Run ``block`` on every recorded call (up to ``most`` stacked per replay) while recording the inputs of its
    candidate weights.

    Raises:
        FloatingPointError: when a weight's inputs are not finite, naming the calibration batch.
        RuntimeError: when a candidate weight was never used in an ``F.linear`` call.
    """

    def fresh() -> dict[str, InputStatistics]:
        return {name: InputStatistics(w.shape[1], w.device, hessian=hessian) for name, w in weights.items()}

    def broken(statistics: Mapping[str, InputStatistics]) -> list[str]:
        return [name for name, stats in statistics.items() if not bool(stats.column_sq_sums.isfinite().all())]

    statistics = fresh()
    with LinearInputRecorder({id(weights[name]): stats for name, stats in statistics.items()}):
        for replay in replays(calls, hidden, most):
            replay.run(block, monitor)
            if not broken(statistics):
                continue
            for index in replay.indices:  # find the batch to name: replay the stacked ones alone
                alone = fresh()
                with LinearInputRecorder({id(weights[name]): stats for name, stats in alone.items()}):
                    calls[index].replay(block, hidden[index])
                if broken(alone) or index == replay.indices[-1]:
                    raise FloatingPointError(
                        f"The inputs of {broken(alone) or broken(statistics)} in block {block_name!r} are not finite "
                        f"on calibration batch {batch_ids[index]}. The model was left unchanged. HINT: check that "
                        "batch's inputs, or run the model in fp32."
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
    residency: Residency | None = None,
    observe: Callable[[Mapping[str, nn.Parameter], Mapping[str, InputStatistics]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every candidate at its sparsity, stack by stack in forward order; return the masks.

    For each stack, one forward per batch (stopped after the stack's last block starts) records every block's
    arguments with the already-pruned upstream stacks in place; from the second batch on, these forwards answer the
    upstream stacks' blocks from their recorded outputs and run only the stack's first block
    (:mod:`ecoflap_pl.pruning.stand_in`, checked on the first batch). Then, block by block: run the block on its
    recorded arguments with the propagated hidden stream while collecting input statistics of its Linear weights
    (summed over ranks with ``all_reduce``), prune them, and re-run the pruned block to produce the next block's
    hidden stream (for a stack's last block too, when a later stack will be captured: its outputs answer the later
    captures). Both runs stack up to ``config.fine_replay_batches`` calibration batches into one call.

    Args:
        tensor_sparsity: parameter name -> sparsity; a candidate missing here is measured but left dense.
        batches: ``(global batch id, batch)`` pairs of this rank.
        observe: called for every block with its candidate weights and their input statistics (summed over ranks),
            before the block is pruned (the dense Wanda pass of the OWL allocation).
        residency: holds an offloaded block's weights resident while it is pruned and stores them back (the
            stored copies are its own undo record, so the transaction keeps no copy of them).
    """
    modules = dict(model.named_modules())
    storage = torch.device("cpu") if config.activation_storage == "cpu" else None
    by_block: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_block.setdefault(candidate.block, []).append(candidate)
    masks: dict[str, torch.Tensor] = {}
    method = get_method(config.method)
    needs_inputs = method.needs_inputs
    batch_ids = {id(batch): batch_id for batch_id, batch in batches}

    upstream: list[StackOutputs] = []
    for position, stack in enumerate(stacks):
        blocks = [modules[name] for name in stack.blocks]
        if needs_inputs:
            calls, forwards = capture_calls(
                modules,
                stack.blocks,
                upstream,
                [batch for _, batch in batches],
                lambda batch: run_on_batch(loss_fn, model, batch, batch_ids[id(batch)]),
                stack.calls_per_forward,
                storage,
            )
            monitor.full_forwards += forwards
            hidden = [cast(torch.Tensor, call.hidden) for call in calls[0]]  # block 0's hidden stream is kept
            call_batch_ids = [batch_id for batch_id, _ in batches for _ in range(stack.calls_per_forward)]
            # the replays run where the blocks ran, wherever the recorded calls are kept (``activation_storage``)
            most = replay_batches(config.fine_replay_batches, hidden, calls[0][0].device or hidden[0].device)
        for index, (block_name, block) in enumerate(zip(stack.blocks, blocks, strict=True)):
            block_candidates = by_block.get(block_name, [])
            with resident(residency, [block_name], write_back=True):
                weights = {c.name: model.get_parameter(c.name) for c in block_candidates}
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
                        most,
                    )
                    if all_reduce is not None:
                        for stats in statistics.values():
                            stats.all_reduce_(all_reduce)
                if observe is not None:
                    observe(weights, statistics)
                for name, weight in weights.items():
                    if name not in tensor_sparsity:
                        continue
                    if residency is None or not residency.offloaded(name):
                        transaction.save(weight)  # an offloaded weight's stored copy is its own undo record
                    masks[name] = method.prune(weight, statistics.get(name), tensor_sparsity[name], config)
                del statistics
                last = index + 1 == len(blocks)
                if needs_inputs and (not last or position + 1 < len(stacks)):
                    outputs = [
                        _stored(output, storage)
                        for replay in replays(calls[index], hidden, most)
                        for output in replay.run(block, monitor)
                    ]
                    if last:
                        upstream.append(StackOutputs(stack.blocks, stack.calls_per_forward, outputs))
                    else:
                        hidden = [hidden_output(output) for output in outputs]
            if needs_inputs:
                calls[index] = []  # free this block's recorded arguments as soon as they are used
            if on_block_done is not None:
                on_block_done()
        logger.debug("Pruned stack %s (%d blocks)", stack.name, len(blocks))
    return masks
