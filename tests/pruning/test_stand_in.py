"""Capture forwards that answer upstream stacks and later blocks from recorded outputs (pruning/stand_in.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ecoflap_pl.pruning.calls import capture_block_calls
from ecoflap_pl.pruning.discovery import find_stacks, order_stacks
from ecoflap_pl.pruning.stand_in import StackOutputs, _same_calls, capture_calls, split_output
from ecoflap_pl.pruning.transaction import pruning_session
from tests.pruning.pruning_helpers import ToyBlock, family_case, toy_batches, toy_loss


def ordered_stacks(model, batch, loss_fn):
    stacks, _ = order_stacks(model, find_stacks(model), lambda: loss_fn(model, batch))
    return stacks


def last_block_outputs(model, stack, batches, loss_fn):
    """What the stack's last block returns on every batch, from the model's own forwards."""
    outputs = []
    handle = model.get_submodule(stack.blocks[-1]).register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        for batch in batches:
            loss_fn(model, batch)
    finally:
        handle.remove()
    return StackOutputs(stack.blocks, stack.calls_per_forward, outputs)


def linear_runs(model, names):
    """A counter of the Linear calls inside the modules ``names``, and the hook handles to remove."""
    runs = [0]

    def count(*_):
        runs[0] += 1

    handles = [
        module.register_forward_pre_hook(count)
        for name in names
        for module in model.get_submodule(name).modules()
        if isinstance(module, nn.Linear)
    ]
    return runs, handles


@pytest.mark.parametrize("family", ["blip2_opt", "blip2_t5", "llama", "eva", "clip"])
def test_answered_capture_records_what_the_plain_capture_records(family):
    # three blocks per stack: one between the first and the last to answer
    model, batches, loss_fn = family_case(family, batches=3, size=2, layers=3)
    with torch.no_grad(), pruning_session(model):  # as the fine step runs: evaluation mode, no KV caches
        _check_answered_capture(model, batches, loss_fn)


def _check_answered_capture(model, batches, loss_fn):
    stacks = ordered_stacks(model, batches[0], loss_fn)
    modules = dict(model.named_modules())
    stack = stacks[-1]
    upstream = [last_block_outputs(model, up, batches, loss_fn) for up in stacks[:-1]]
    plain = capture_block_calls(
        [modules[name] for name in stack.blocks],
        batches,
        lambda batch: loss_fn(model, batch),
        calls_per_forward=stack.calls_per_forward,
    )
    answered_blocks = [name for up in stacks[:-1] for name in up.blocks] + list(stack.blocks[1:])
    runs, handles = linear_runs(model, answered_blocks)
    try:
        calls, forwards = capture_calls(
            modules, stack.blocks, upstream, batches, lambda b: loss_fn(model, b), stack.calls_per_forward, None
        )
    finally:
        for handle in handles:
            handle.remove()
    assert _same_calls(plain, calls)
    assert forwards == 1 + len(batches)
    # the answered blocks ran only in the plain capture of the first batch (its later blocks up to the last one)
    runs_alone, handles = linear_runs(model, answered_blocks)
    try:
        capture_block_calls([modules[n] for n in stack.blocks], batches[:1], lambda b: loss_fn(model, b))
    finally:
        for handle in handles:
            handle.remove()
    assert runs[0] == runs_alone[0] > 0


class _ScaledByPreviousModel(nn.Module):
    """Each block's ``scale`` is computed from the previous block's output: an answered capture changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layers = nn.ModuleList(ToyBlock(16) for _ in range(3))
        self.head = nn.Linear(16, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        scale = torch.ones(())
        for layer in self.layers:
            hidden = layer(hidden, scale=scale)
            scale = hidden.abs().mean()
        return self.head(hidden).mean(dim=1)


@torch.no_grad()
def test_a_capture_whose_answers_change_the_arguments_falls_back_to_the_plain_one(caplog):
    torch.manual_seed(0)
    model = _ScaledByPreviousModel().eval()
    batches = toy_batches(3)
    modules = dict(model.named_modules())
    blocks = [f"layers.{i}" for i in range(3)]
    plain = capture_block_calls([modules[n] for n in blocks], batches, lambda b: toy_loss(model, b))
    with caplog.at_level(logging.INFO, logger="ecoflap_pl.pruning.stand_in"):
        calls, forwards = capture_calls(modules, blocks, [], batches, lambda b: toy_loss(model, b), 1, None)
    assert _same_calls(plain, calls)
    assert forwards == 1 + len(batches)
    assert "the plain capture is used" in caplog.text


def test_split_output_splits_batch_tensors_and_keeps_shared_ones():
    hidden, bias = torch.arange(10.0).reshape(5, 2), torch.randn(1, 3)
    first, second = split_output((hidden, bias), [2, 3])
    assert torch.equal(first[0], hidden[:2]) and torch.equal(second[0], hidden[2:])
    assert first[1] is bias and second[1] is bias
