"""Recording and replaying the calls of the blocks of one stack.

During one real forward of the model per calibration batch, forward pre-hooks record every block's positional
and keyword arguments; the forward stops at the last block of the stack with a private exception. A block is
later replayed on its own recorded arguments with only the *hidden stream* (its first positional argument, or
``hidden_states=``) replaced by the output of the already-pruned block before it, so every other argument
(masks, T5 position biases, rotary embeddings, encoder states) stays exactly what the model passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_HIDDEN_KWARG = "hidden_states"


class _StopForward(Exception):
    """Raised by the last block's pre-hook to end a forward pass early; caught by type only here."""


@dataclass
class BlockCall:
    """One recorded call of a block. ``hidden`` is None when the hidden stream was dropped to save memory."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: int | str
    hidden: torch.Tensor | None
    device: torch.device | None = None

    def replay(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on the recorded arguments with the hidden stream set to ``hidden``; return its output's
        hidden stream."""
        return hidden_output(self.run(block, hidden))

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """Run ``block`` on the recorded arguments with the hidden stream set to ``hidden``; return what it returns.

        A call recorded into other storage (``capture_block_calls(storage=...)``) is moved back to the device its
        block ran on first."""
        args, kwargs = list(self.args), dict(self.kwargs)
        if self.device is not None:
            args, kwargs, hidden = _moved(args, self.device), _moved(kwargs, self.device), hidden.to(self.device)
        if isinstance(self.hidden_key, int):
            args[self.hidden_key] = hidden
        else:
            kwargs[self.hidden_key] = hidden
        return block(*args, **kwargs)


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (inside plain tuples, lists and dicts) on ``device``; other objects kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_moved(item, device) for item in value)
    if type(value) is dict:
        return {key: _moved(item, device) for key, item in value.items()}
    return value


def _hidden_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | str:
    if args and isinstance(args[0], torch.Tensor):
        return 0
    if isinstance(kwargs.get(_HIDDEN_KWARG), torch.Tensor):
        return _HIDDEN_KWARG
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key
    raise TypeError("A block was called without any tensor argument; cannot find its hidden stream.")


def hidden_output(output: Any) -> torch.Tensor:
    """The hidden stream of a block's output: the tensor itself or the first element of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    to_tuple = getattr(output, "to_tuple", None)
    if callable(to_tuple):
        return hidden_output(to_tuple())
    raise TypeError(f"Cannot find the hidden stream in a block output of type {type(output).__name__}.")


def capture_block_calls(
    blocks: Sequence[nn.Module],
    batches: Sequence[Any],
    run_forward: Callable[[Any], Any],
    keep_hidden: bool = False,
    calls_per_forward: int = 1,
    storage: torch.device | None = None,
) -> list[list[BlockCall]]:
    """Record every block's calls on every batch; ``calls[block][batch * calls_per_forward + run]``.

    Args:
        blocks: the blocks of one stack, in forward order.
        batches: calibration batches.
        run_forward: ``run_forward(batch)`` runs the whole model on one batch (the calibration loss).
        keep_hidden: keep the hidden stream of every block (tests); by default only block 0's is kept.
        calls_per_forward: how many times one forward runs the stack; the forward stops when the last block
            starts for the last time.
        storage: keep the recorded tensors on this device (``cpu``) instead of where the model made them.

    Raises:
        RuntimeError: when a block of the stack did not run ``calls_per_forward`` times during a forward pass.
    """
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1
    expected = 0

    def recorder(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(calls[index]) < expected:
                key = _hidden_key(args, kwargs)
                hidden = args[key] if isinstance(key, int) else kwargs[key]
                if isinstance(key, int):
                    args = args[:key] + (None,) + args[key + 1 :]
                else:
                    kwargs = {**kwargs, key: None}
                kept = hidden if (index == 0 or keep_hidden) else None
                if storage is None:
                    calls[index].append(BlockCall(args, kwargs, key, kept))
                else:
                    stored = kept.to(storage) if kept is not None else None
                    moved = BlockCall(_moved(args, storage), _moved(kwargs, storage), key, stored, hidden.device)
                    calls[index].append(moved)
            if index == last and len(calls[last]) == expected:
                raise _StopForward

        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch_index, batch in enumerate(batches):
            expected = (batch_index + 1) * calls_per_forward
            try:
                run_forward(batch)
            except _StopForward:
                pass
            silent = [i for i, block_calls in enumerate(calls) if len(block_calls) != expected]
            if silent:
                raise RuntimeError(
                    f"Blocks {silent} of a stack of {len(blocks)} did not run {calls_per_forward} time(s) during the "
                    f"forward pass of calibration batch {batch_index}. HINT: exclude blocks the calibration loss "
                    "does not use, and keep the model's control flow the same for every batch."
                )
    finally:
        for handle in handles:
            handle.remove()
    return calls


class _NotMergeable(Exception):
    """Recorded calls whose arguments cannot be stacked along the batch dimension."""


def _merged(values: Sequence[Any], sizes: Sequence[int]) -> Any:
    """One argument of several calls as one: tensors with the calls' batch sizes as leading dimension are
    concatenated, every other value must be the same in every call (a shared position bias, rotary tables)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise _NotMergeable
        if all(v.ndim and v.shape[0] == size for v, size in zip(values, sizes, strict=True)) and all(
            v.shape[1:] == first.shape[1:] and v.dtype == first.dtype for v in values
        ):
            return torch.cat(list(values))
        if all(v is first or (v.shape == first.shape and torch.equal(v, first)) for v in values):
            return first
        raise _NotMergeable
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        if not all(type(v) is type(first) and len(v) == len(first) for v in values):
            raise _NotMergeable
        return type(first)(_merged([v[i] for v in values], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise _NotMergeable
        return {key: _merged([v[key] for v in values], sizes) for key in first}
    if all(v is first for v in values) or all(type(v) is type(first) and v == first for v in values):
        return first
    raise _NotMergeable


def merge_calls(calls: Sequence[BlockCall], hidden: Sequence[torch.Tensor]) -> tuple[BlockCall, torch.Tensor] | None:
    """Several recorded calls of one block (one per calibration batch) as one call on their stacked batches.

    Returns the merged call and hidden stream, or None when the calls cannot be stacked (different sequence
    lengths, arguments that differ between batches without a batch dimension, different keyword sets).
    Samples are independent in a transformer block, so the merged call's output rows are the calls' outputs.
    """
    if len(calls) == 1:
        return calls[0], hidden[0]
    sizes = [int(state.shape[0]) if state.ndim else 0 for state in hidden]
    first = calls[0]
    if not all(
        call.hidden_key == first.hidden_key and len(call.args) == len(first.args) and call.device == first.device
        for call in calls
    ):
        return None
    try:
        merged_hidden = _merged(list(hidden), sizes)
        args = tuple(_merged([call.args[i] for call in calls], sizes) for i in range(len(first.args)))
        if not all(call.kwargs.keys() == first.kwargs.keys() for call in calls):
            return None
        kwargs = {key: _merged([call.kwargs[key] for call in calls], sizes) for key in first.kwargs}
    except _NotMergeable:
        return None
    if merged_hidden.ndim == 0 or merged_hidden.shape[0] != sum(sizes):
        return None
    # calls kept in other storage keep their device: the merged one is replayed there too
    return BlockCall(args, kwargs, first.hidden_key, None, first.device), merged_hidden
