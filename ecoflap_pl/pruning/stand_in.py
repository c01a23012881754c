"""Capture forwards of the fine step that run only what the capture needs.

The fine step records each block's arguments with one forward per calibration batch (:mod:`ecoflap_pl.pruning.calls`).
Run plainly, that forward computes two things nobody uses:

- the **upstream stacks**, already pruned, whose outputs the fine step has just computed itself: every call of a block
  of an upstream stack is answered with the recorded output of that stack's last block for the same call (the blocks
  before the last pass it along unchanged, the last one returns it), so none of them runs;
- the **stack's own blocks after the first**, whose outputs only feed the next block of the stack (whose hidden
  stream is replaced at replay anyway): each call of block ``j >= 1`` is answered with block 0's output of the same
  run, so only block 0 runs.

Nothing here knows a model family. Whether the model's own code derives a later block's other arguments (masks, a T5
position bias) from these outputs in a way the answers would change is not assumed: :func:`capture_calls` compares,
on the first batch, every recorded argument of the answered capture with the plain one, exactly, and captures plainly
when any differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.block_outputs import CallKey, answered_calls, map_tensors, tensor_leaves
from ecoflap_pl.pruning.calls import BlockCall, capture_block_calls

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackOutputs:
    """What a pruned stack's last block returned, for every recorded call (``outputs[batch * calls + run]``)."""

    blocks: tuple[str, ...]
    calls_per_forward: int
    outputs: list[Any]


def split_output(output: Any, sizes: Sequence[int]) -> list[Any]:
    """The outputs of a block replayed on several stacked calls, one per call: every tensor whose leading dimension
    is ``sum(sizes)`` is split along it, other values (a position bias shared by the calls) are kept whole."""
    total, pieces, start = sum(sizes), [], 0
    for size in sizes:

        def piece(tensor: torch.Tensor, start: int = start, size: int = size) -> torch.Tensor:
            return tensor[start : start + size] if tensor.ndim and tensor.shape[0] == total else tensor

        pieces.append(map_tensors(output, piece))
        start += size
    return pieces


def _on(value: Any, device: torch.device | None) -> Any:
    return value if device is None else map_tensors(value, lambda t: t.to(device))


@contextmanager
def _answered(
    modules: Mapping[str, nn.Module],
    current: Sequence[str],
    upstream: Sequence[StackOutputs],
    batch_index: Callable[[], int],
    device: torch.device | None,
) -> Iterator[dict[str, int]]:
    """Answer the calls of ``upstream`` stacks' blocks and of ``current``'s blocks after the first (see module).

    Yields the calls seen per block, to be reset between forwards."""
    owner = {name: stack for stack in upstream for name in stack.blocks}
    firsts: dict[int, Any] = {}

    def handler(key: CallKey, run: Callable[[], Any]) -> Any:
        name, index = key
        stack = owner.get(name)
        if stack is not None:
            return _on(stack.outputs[batch_index() * stack.calls_per_forward + index], device)
        if name == current[0]:
            firsts[index] = run()
            return firsts[index]
        return firsts[index]

    blocks = {name: modules[name] for name in (*owner, *current[:-1])}
    with answered_calls(blocks, handler) as counts:
        yield counts


def _same(a: Any, b: Any) -> bool:
    """Exact equality of recorded arguments (tensors bit for bit, with dtype, shape and device)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and not hasattr(a, "_fields"):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a is b or a == b)
    except (RuntimeError, TypeError, ValueError):  # objects whose == is not a plain truth value
        return False


def _same_calls(a: Sequence[Sequence[BlockCall]], b: Sequence[Sequence[BlockCall]]) -> bool:
    return all(
        len(x) == len(y)
        and all(
            p.hidden_key == q.hidden_key
            and p.device == q.device
            and _same(p.args, q.args)
            and _same(p.kwargs, q.kwargs)
            and _same(p.hidden, q.hidden)
            for p, q in zip(x, y, strict=True)
        )
        for x, y in zip(a, b, strict=True)
    )


def capture_calls(
    modules: Mapping[str, nn.Module],
    stack_blocks: Sequence[str],
    upstream: Sequence[StackOutputs],
    batches: Sequence[Any],
    run_forward: Callable[[Any], Any],
    calls_per_forward: int,
    storage: torch.device | None,
) -> tuple[list[list[BlockCall]], int]:
    """Every block's recorded calls on every batch (as :func:`~ecoflap_pl.pruning.calls.capture_block_calls`), with
    the calls of upstream stacks and of the stack's blocks after the first answered (see module) once the first
    batch showed that this records exactly what the plain capture records.

    Returns:
        ``calls[block][batch * calls_per_forward + run]`` and the number of forwards run (one more than the batches
        when the first batch was captured both ways).
    """
    blocks = [modules[name] for name in stack_blocks]

    def capture(chosen: Sequence[Any]) -> list[list[BlockCall]]:
        return capture_block_calls(blocks, chosen, run_forward, calls_per_forward=calls_per_forward, storage=storage)

    plain = capture(batches[:1])
    if len(batches) <= 1:
        return plain, len(batches)
    device = next((call.device for call in plain[0] if call.device is not None), None)
    current = 0

    def batch_index() -> int:
        return current

    recorded = [t for stack in upstream for output in stack.outputs for t in tensor_leaves(output)]
    versions = [t._version for t in recorded]
    try:
        with _answered(modules, stack_blocks, upstream, batch_index, device) as counts:

            def capture_answered(index: int) -> list[list[BlockCall]]:
                nonlocal current
                current = index
                counts.update(dict.fromkeys(counts, 0))
                return capture(batches[index : index + 1])

            answered = capture_answered(0)
            if _same_calls(plain, answered) and versions == [t._version for t in recorded]:
                calls = plain
                for index in range(1, len(batches)):
                    calls = [p + c for p, c in zip(calls, capture_answered(index), strict=True)]
                return calls, 1 + len(batches)
        reason = "changed the recorded arguments"
    except (TypeError, ValueError, IndexError, RuntimeError) as error:  # the model's code rejected an answer
        reason = f"failed ({error})"
    logger.info(
        "Capturing the block calls of %s with upstream stacks and later blocks answered from recorded outputs %s; "
        "the plain capture is used.",
        stack_blocks[0].rsplit(".", 1)[0],
        reason,
    )
    return [p + c for p, c in zip(plain, capture(batches[1:]), strict=True)], 1 + len(batches)
