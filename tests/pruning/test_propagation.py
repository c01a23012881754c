"""The fine step's recording, replay and propagation against the models' own forward passes and slow references."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.calls import capture_block_calls, hidden_output
from ecoflap_pl.pruning.statistics import InputStatistics, LinearInputRecorder
from ecoflap_pl.pruning.transaction import pruning_session
from tests.pruning.pruning_helpers import (
    family_case,
    own_block_outputs,
    slow_row_mask,
    toy_batches,
    toy_linear_inputs,
    toy_loss,
)


@pytest.mark.parametrize(
    ("family", "stack"),
    [
        ("t5", "encoder.block"),
        ("t5", "decoder.block"),
        ("llama", "model.layers"),
        ("vilt", "vilt.encoder.layer"),
        ("blip2_opt", "language_model.model.decoder.layers"),
    ],
)
def test_replaying_dense_blocks_reproduces_the_models_own_hidden_states(family, stack):
    model, batches, family_loss = family_case(family, layers=3)

    def loss_fn(model, batch):
        torch.manual_seed(0)  # ViLT orders its image patches with torch.multinomial on the global generator
        return family_loss(model, batch)

    blocks = list(model.get_submodule(stack))
    calls_per_forward = 2 if family == "vilt" else 1  # ViLT's NLVR2 head encodes each of its two images
    with pruning_session(model), torch.no_grad():
        expected = own_block_outputs(model, blocks, batches, loss_fn)
        calls = capture_block_calls(
            blocks, batches, lambda batch: loss_fn(model, batch), keep_hidden=True, calls_per_forward=calls_per_forward
        )
        assert [len(block_calls) for block_calls in calls] == [len(batches) * calls_per_forward] * len(blocks)
        for call_index, first in enumerate(calls[0]):
            hidden = first.hidden
            for index, block in enumerate(blocks):
                hidden = calls[index][call_index].replay(block, hidden)
                assert torch.equal(hidden, expected[index][call_index]), (index, call_index)


def test_t5_blocks_are_replayed_with_their_own_position_bias():
    """The official code replays T5 blocks after the first with position_bias=None; that changes their output."""
    model, batches, loss_fn = family_case("t5", layers=2)
    for stack in (model.encoder.block, model.decoder.block):
        blocks = list(stack)
        with pruning_session(model), torch.no_grad():
            calls = capture_block_calls(blocks, batches[:1], lambda batch: loss_fn(model, batch), keep_hidden=True)
            call = calls[1][0]
            bound = inspect.signature(blocks[1].forward).bind(*call.args, **call.kwargs)
            assert isinstance(bound.arguments["position_bias"], torch.Tensor)
            faithful = call.replay(blocks[1], calls[1][0].hidden)
            bound.arguments["position_bias"] = None
            bound.arguments["hidden_states"] = calls[1][0].hidden
            quirk = hidden_output(blocks[1](*bound.args, **bound.kwargs))
        assert not torch.allclose(faithful, quirk)


def wanda_reference_masks(model, block, prefix, batches, loss_fn, sparsity):
    """Wanda masks of the Linear layers of ``block`` from module hooks over complete forward passes of ``model``."""
    linears = {name: module for name, module in block.named_modules(prefix=prefix) if isinstance(module, nn.Linear)}
    sums = {name: torch.zeros(module.in_features) for name, module in linears.items()}

    def hook_for(name):
        def hook(module, args):
            sums[name] += args[0].detach().reshape(-1, module.in_features).float().square().sum(dim=0)

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        with pruning_session(model), torch.no_grad():
            for batch in batches:
                loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {
        f"{name}.weight": slow_row_mask(module.weight.detach().float().abs() * sums[name].sqrt(), sparsity)
        for name, module in linears.items()
    }


def slow_sequential_wanda(model, batches, sparsity):
    """Block by block: measure inputs, prune with Wanda, and feed the *pruned* block's outputs to the next one."""
    model = copy.deepcopy(model)
    masks = {}
    with torch.no_grad():
        for index, linears in toy_linear_inputs(model, batches):
            for name, linear, inputs in linears:
                sq_sums = torch.zeros(linear.in_features)
                for x in inputs:
                    sq_sums += x.reshape(-1, linear.in_features).square().sum(dim=0)
                mask = slow_row_mask(linear.weight.abs() * sq_sums.sqrt(), sparsity)
                linear.weight.mul_(mask)
                masks[f"layers.{index}.{name}.weight"] = mask
    return masks


def test_each_block_is_measured_on_the_pruned_outputs_of_the_blocks_before_it(toy_model):
    batches = toy_batches(3)
    expected = slow_sequential_wanda(toy_model, batches, 0.5)
    config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=12)
    result = prune(toy_model, batches, toy_loss, config)
    assert result.masks.keys() == expected.keys()
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name


def test_fine_step_differs_from_measuring_on_dense_upstream_outputs(toy_model):
    """Sanity of the reference above: with dense blocks upstream, block 1 and 2 would get other masks."""
    batches = toy_batches(3)
    sequential = slow_sequential_wanda(toy_model, batches, 0.5)
    dense_masks = {}
    for index in (1, 2):
        dense_masks.update(
            wanda_reference_masks(toy_model, toy_model.layers[index], f"layers.{index}", batches, toy_loss, 0.5)
        )
    assert any(not torch.equal(sequential[name], mask) for name, mask in dense_masks.items())


def test_decoder_is_measured_on_the_pruned_encoders_outputs():
    """Stacks are pruned in forward order: T5's decoder block 0 sees the outputs of the already-pruned encoder."""
    model, batches, loss_fn = family_case("t5", batches=2)
    original = copy.deepcopy(model)
    result = prune(model, batches, loss_fn, PruningConfig(sparsity=0.5, importance="uniform", fine_samples=4))

    upstream_pruned = copy.deepcopy(original)
    with torch.no_grad():
        for name, parameter in upstream_pruned.named_parameters():
            if name.startswith("encoder.") and name in result.masks:
                parameter.masked_fill_(~result.masks[name], 0)
    expected = wanda_reference_masks(
        upstream_pruned, upstream_pruned.decoder.block[0], "decoder.block.0", batches, loss_fn, 0.5
    )
    assert expected.keys() == {name for name in result.masks if name.startswith("decoder.block.0.")}
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name

    with_dense_encoder = wanda_reference_masks(
        original, original.decoder.block[0], "decoder.block.0", batches, loss_fn, 0.5
    )
    cross_attention = [name for name in expected if "EncDecAttention.k" in name or "EncDecAttention.v" in name]
    assert any(not torch.equal(with_dense_encoder[name], expected[name]) for name in cross_attention)


def test_vilt_statistics_cover_both_images():
    """ViLT's NLVR2 head runs the encoder once per image: both runs are measured, as module hooks see them."""
    model, batches, loss_fn = family_case("vilt")
    original = copy.deepcopy(model)
    result = prune(model, batches, loss_fn, PruningConfig(sparsity=0.5, importance="uniform", fine_samples=4))
    expected = wanda_reference_masks(
        original, original.vilt.encoder.layer[0], "vilt.encoder.layer.0", batches, loss_fn, 0.5
    )
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name


def test_eva_fused_qkv_statistics_come_from_the_functional_call():
    """timm EVA calls F.linear(x, qkv.weight, qkv_bias): the qkv module never runs, its inputs are norm1's output."""
    model, batches, loss_fn = family_case("eva")
    block = model.blocks[0]
    assert block.attn.q_bias is not None  # the configuration that bypasses the qkv module
    module_calls = []
    norm1_sq_sums = torch.zeros(block.norm1.normalized_shape[0])

    def on_norm1(module, args, output):
        norm1_sq_sums.add_(output.detach().reshape(-1, output.shape[-1]).square().sum(dim=0))

    statistics = InputStatistics(block.attn.qkv.in_features, torch.device("cpu"), hessian=False)
    with pruning_session(model), torch.no_grad():
        calls = capture_block_calls(list(model.blocks), batches, lambda batch: loss_fn(model, batch))
        handles = [
            block.attn.qkv.register_forward_hook(lambda *args: module_calls.append(1)),
            block.norm1.register_forward_hook(on_norm1),
        ]
        try:
            with LinearInputRecorder({id(block.attn.qkv.weight): statistics}):
                for call in calls[0]:
                    call.replay(block, call.hidden)
        finally:
            for handle in handles:
                handle.remove()
    assert module_calls == []
    assert statistics.calls == len(batches)
    torch.testing.assert_close(statistics.column_sq_sums, norm1_sq_sums, rtol=1e-6, atol=0)

    original = copy.deepcopy(model)
    result = prune(model, batches, loss_fn, PruningConfig(sparsity=0.5, importance="uniform", fine_samples=4))
    qkv = original.blocks[0].attn.qkv.weight.detach()
    assert torch.equal(result.masks["blocks.0.attn.qkv.weight"], slow_row_mask(qkv.abs() * norm1_sq_sums.sqrt(), 0.5))
