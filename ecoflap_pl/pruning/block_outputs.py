"""Recording what the dense model's blocks return, and answering later block calls from that record.

A perturbation of a weight in block ``k`` cannot change anything the model computed before block ``k`` first
started: the upstream blocks of the same stack and every upstream tower. One real forward per calibration batch
records, for every call of every block of every stack, its output and when the call started and ended. A probe
forward then lets each call that *ended before the perturbed block first started* return its recorded output
without running, so only block ``k`` onward (and the glue between blocks: embeddings, projections, the head and
the loss) is computed again. Nothing here knows a model family: blocks are the discovered stacks' members, calls
are told apart by their order, and outputs are whatever the block returned.

Answering a call means replacing the block's ``forward`` for the duration of a context (the ``nn.Module`` call
machinery and every hook stay in place); the original is always put back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.calls import hidden_output
from ecoflap_pl.pruning.discovery import find_stacks

CallKey = tuple[str, int]
"""(block name, index of the call within one forward pass)."""
CallHandler = Callable[[CallKey, Callable[[], Any]], Any]
"""``handler(key, run)`` returns the block's output for call ``key``; ``run()`` computes it for real."""


class NotReplicable(Exception):
    """A block output or Linear input did not carry the replicas along its leading dimension."""


def stack_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every block of every discovered stack (the outermost ones, so no block holds another), by name."""
    modules = dict(model.named_modules())
    return {name: modules[name] for stack in find_stacks(model) for name in stack.blocks}


def map_tensors(value: Any, function: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``function`` applied to every tensor inside tuples, lists, dicts and ModelOutputs."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(item, function) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, function) for item in value)
    if isinstance(value, Mapping):
        mapped = {key: map_tensors(item, function) for key, item in value.items()}
        kind: Any = type(value)  # dict, OrderedDict or a Hugging Face ModelOutput (built from keywords)
        try:
            return kind(**mapped) if hasattr(value, "to_tuple") else kind(mapped)
        except TypeError:
            return mapped
    return value


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value``, in a fixed order."""
    found: list[torch.Tensor] = []
    map_tensors(value, found.append)
    return found


@contextmanager
def answered_calls(blocks: Mapping[str, nn.Module], handler: CallHandler) -> Iterator[dict[str, int]]:
    """Route every call of every block through ``handler`` while the context is open.

    Yields the number of calls seen per block (reset by the caller between forwards).
    """
    counts: dict[str, int] = dict.fromkeys(blocks, 0)
    patched: list[tuple[nn.Module, Any]] = []

    def routed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            index = counts[name]
            counts[name] += 1
            return handler((name, index), lambda: original(*args, **kwargs))

        return forward

    try:
        for name, block in blocks.items():
            patched.append((block, block.__dict__.get("forward")))
            block.forward = routed(name, block.forward)  # type: ignore[method-assign]
        yield counts
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own  # type: ignore[method-assign]


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(device)


@dataclass
class BlockRecord:
    """The dense model's block calls on one calibration batch.

    Attributes:
        outputs: call -> what the block returned (detached; on ``storage``).
        starts, ends: call -> position of its start / end among all start and end events of the forward.
        devices: call -> the device its block ran on (blocks of a dispatched model run on different devices).
        loss: the dense loss of the batch.
        storage: where the outputs are kept (the devices the blocks ran on, or the CPU to save device memory); None:
            each output where its block ran.
    """

    outputs: dict[CallKey, Any] = field(default_factory=dict)
    starts: dict[CallKey, int] = field(default_factory=dict)
    ends: dict[CallKey, int] = field(default_factory=dict)
    devices: dict[CallKey, torch.device] = field(default_factory=dict)
    loss: float = 0.0
    storage: torch.device | None = None
    _versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for output in self.outputs.values() for t in tensor_leaves(output))

    def finished_before(self, start: int) -> set[CallKey]:
        """The calls that ended before event ``start``: nothing started later can have changed them."""
        return {key for key, end in self.ends.items() if end < start}

    def output(self, key: CallKey) -> Any:
        """The recorded output of ``key`` on the device its block ran on."""
        output, device = self.outputs[key], self.devices[key]
        return output if self.storage in (None, device) else map_tensors(output, lambda t: t.to(device))

    def to(self, storage: torch.device | None) -> BlockRecord:
        """This record with its outputs kept on ``storage`` (None: where their blocks ran)."""
        if storage == self.storage:
            return self
        moved = BlockRecord(
            {
                key: map_tensors(output, partial(_to, storage or self.devices[key]))
                for key, output in self.outputs.items()
            },
            self.starts,
            self.ends,
            self.devices,
            self.loss,
            storage,
        )
        moved.watch_versions()
        return moved

    def watch_versions(self) -> None:
        """Remember the version counter of every recorded tensor, for :meth:`check_unchanged`."""
        self._versions = [(t, t._version) for output in self.outputs.values() for t in tensor_leaves(output)]

    def check_unchanged(self) -> bool:
        """True while no recorded tensor was modified in place by the code that consumed it."""
        return all(tensor._version == version for tensor, version in self._versions)


def record_block_calls(
    blocks: Mapping[str, nn.Module], run_forward: Callable[[], torch.Tensor], storage: torch.device | None
) -> BlockRecord:
    """Run the dense forward once, recording every block call's output, the device it ran on and its start/end
    events; outputs are kept on ``storage`` (None: where they were computed)."""
    record = BlockRecord(storage=storage)
    events = 0

    def handler(key: CallKey, run: Callable[[], Any]) -> Any:
        nonlocal events
        record.starts[key] = events
        events += 1
        output = run()
        record.ends[key] = events
        events += 1
        record.devices[key] = hidden_output(output).device
        record.outputs[key] = map_tensors(output, lambda t: t.detach().to(storage or t.device))
        return output

    with answered_calls(blocks, handler):
        record.loss = float(run_forward())
    record.watch_versions()
    return record


def replicate(value: Any, replicas: int, size: int) -> Any:
    """Every tensor whose leading dimension is ``size`` repeated ``replicas`` times along it (replica-major)."""

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 0 or tensor.shape[0] != size:
            return tensor
        return tensor.repeat(replicas, *([1] * (tensor.ndim - 1)))

    return map_tensors(value, repeat)


def replicate_output(output: Any, replicas: int) -> Any:
    """A recorded block output for a forward carrying ``replicas`` copies of the batch: the tensors shaped like the
    hidden stream along the leading dimension are repeated, others (a shared position bias) are kept."""
    return replicate(output, replicas, hidden_output(output).shape[0])


def replica_slice(batched: Any, dense: Any, replicas: int, index: int) -> Any:
    """Replica ``index``'s part of a block output computed on ``replicas`` copies of the batch.

    Raises:
        NotReplicable: when a tensor of the output is neither ``replicas`` times the dense one along its leading
            dimension nor shaped like it.
    """
    dense_leaves = iter(tensor_leaves(dense))

    def take(tensor: torch.Tensor) -> torch.Tensor:
        reference = next(dense_leaves, None)
        if reference is None:
            raise NotReplicable("a block returned more tensors with replicas than without")
        if tensor.ndim and reference.ndim and tensor.shape[0] == replicas * reference.shape[0]:
            size = reference.shape[0]
            return tensor[index * size : (index + 1) * size]
        if tensor.shape == reference.shape:
            return tensor
        raise NotReplicable(f"a block output of shape {tuple(tensor.shape)} does not hold {replicas} replicas")

    return map_tensors(batched, take)


def batch_size(batch: Any) -> int:
    """The samples in ``batch``: the leading dimension of its first tensor that has one (1 when it holds none).

    Tensors are found inside tuples, lists and any mapping (a tokenizer's ``BatchEncoding`` is a ``UserDict``); a
    0-d tensor first (a count of items) is no batch dimension."""
    leaves = tensor_leaves(batch)
    return next((int(t.shape[0]) for t in leaves if t.ndim), 1)
