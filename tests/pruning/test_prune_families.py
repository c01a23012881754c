"""prune() on tiny random-initialised models of every supported family, and on a plain nn.Module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.discovery import find_stacks
from tests.pruning.pruning_helpers import family_case, snapshot, toy_batches, toy_loss

STACKS = {
    "blip2_opt": ["vision_model.encoder.layers", "language_model.model.decoder.layers"],
    "blip2_t5": ["vision_model.encoder.layers", "language_model.encoder.block", "language_model.decoder.block"],
    "blip": ["vision_model.encoder.layers", "text_decoder.bert.encoder.layer"],
    "clip": ["vision_model.encoder.layers", "text_model.encoder.layers"],
    "vilt": ["vilt.encoder.layer"],
    "t5": ["encoder.block", "decoder.block"],
    "llama": ["model.layers"],
    "vit": ["blocks"],
    "eva": ["blocks"],
}
"""Family -> the stacks pruned, in the order the forward pass runs them (BLIP-2's Q-Former is excluded)."""

NEVER_PRUNED = ("qformer", "embed", "relative_attention_bias", "lm_head", "head", "classifier", "norm")


def linear_weights(model: nn.Module, stacks: list[str]) -> set[str]:
    return {
        f"{stack}.{name}.weight"
        for stack in stacks
        for name, module in model.get_submodule(stack).named_modules()
        if isinstance(module, nn.Linear)
    }


def check_result(model, before, result, config):
    """Exact counts (round(numel · s) per tensor, per-row counts equal up to one), achieved = what the masks say,
    kept weights untouched, everything else bit-identical."""
    parameters = dict(model.named_parameters())
    for name, mask in result.masks.items():
        target = result.target_sparsity[name]
        rows, cols = mask.shape
        pruned_per_row = (~mask).sum(dim=1)
        assert int(pruned_per_row.sum()) == round(rows * cols * target), name
        assert int(pruned_per_row.max() - pruned_per_row.min()) <= 1, name
        assert result.achieved_sparsity[name] == pytest.approx(1 - float(mask.sum()) / mask.numel(), abs=0)
        assert abs(target - result.achieved_sparsity[name]) <= 0.5 / mask.numel() + 1e-12, name
        assert torch.equal(parameters[name].detach(), before[name].masked_fill(~mask, 0)), name
    for name, tensor in before.items():
        if name not in result.masks:
            assert torch.equal(model.state_dict()[name], tensor), name
    assert set(result.target_sparsity) == set(result.masks)
    group_of = {name: group for group, names in result.groups.items() for name in names}
    for name, sparsity in result.target_sparsity.items():
        assert sparsity == result.group_sparsity[group_of[name]]
    kept = sum(result.sizes[n] * (1 - result.group_sparsity[group_of[n]]) for n in result.sizes)
    assert kept == pytest.approx(sum(result.sizes.values()) * (1 - config.sparsity), abs=1)  # exact global budget


@pytest.mark.parametrize("family", list(STACKS))
def test_every_family_is_pruned(family):
    model, batches, loss_fn = family_case(family, batches=2, size=2)
    before = snapshot(model)
    block_runs = block_runs_per_forward(model, STACKS[family], loss_fn, batches[0])
    config = PruningConfig(sparsity=0.5, coarse_samples=2, fine_samples=4)
    result = prune(model, batches, loss_fn, config)

    assert list(result.towers) == STACKS[family]
    candidates = linear_weights(model, STACKS[family])
    assert set(result.masks) == candidates
    assert not [name for name in result.masks if any(word in name.split(".")[-2] for word in NEVER_PRUNED)]
    assert not [name for name in result.masks if "qformer" in name or "relative_attention_bias" in name]
    blocks = {name for stack in STACKS[family] for name in find_block_names(model, stack)}
    assert set(result.groups) == blocks  # every block of every stack is a group and was pruned
    assert all(0 < sparsity <= config.max_sparsity for sparsity in result.tower_sparsity().values())
    # the ± probes of every candidate (one batch, one probe) shared forwards of 8 replicas, and the blocks before the
    # probed one never re-ran: fewer block runs than one full forward per probe would make
    coarse = result.stages["coarse"]
    assert coarse.probe_replicas == 8
    assert 0 < coarse.block_forwards < 2 * len(candidates) * block_runs
    check_result(model, before, result, config)
    with torch.no_grad():
        assert math.isfinite(float(loss_fn(model, batches[0])))


def block_runs_per_forward(model, stacks, loss_fn, batch):
    """How many times one forward pass runs a block of ``stacks``."""
    runs = []
    blocks = [model.get_submodule(name) for stack in stacks for name in find_block_names(model, stack)]
    handles = [block.register_forward_pre_hook(lambda *_: runs.append(1)) for block in blocks]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return len(runs)


def find_block_names(model, stack):
    return [f"{stack}.{name}" for name, _ in model.get_submodule(stack).named_children()]


def test_stack_order_is_the_forward_order_not_the_registration_order():
    model, batches, loss_fn = family_case("clip")
    assert [stack.name for stack in find_stacks(model)] == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    result = prune(model, batches, loss_fn, PruningConfig(sparsity=0.5, importance="uniform", fine_samples=2))
    assert list(result.towers) == ["vision_model.encoder.layers", "text_model.encoder.layers"]


def test_blip2_qformer_and_cross_tower_parts_stay_dense():
    model, batches, loss_fn = family_case("blip2_opt")
    before = snapshot(model)
    result = prune(model, batches, loss_fn, PruningConfig(sparsity=0.5, importance="uniform", fine_samples=4))
    untouched = [name for name in before if name.startswith(("qformer.", "query_tokens", "language_projection."))]
    assert untouched and all(torch.equal(model.state_dict()[name], before[name]) for name in untouched)
    assert not any(name.startswith("qformer.") for name in result.masks)


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(sparsity=0.5, fine_samples=8, coarse_samples=8),
        PruningConfig(sparsity=0.6, importance="first_order", score="grad_mag_abs", granularity="layer"),
        PruningConfig(sparsity=0.4, method="sparsegpt", probe_granularity="per_block", granularity="model"),
        PruningConfig(sparsity=0.5, method="magnitude", importance="uniform"),
        PruningConfig(sparsity=0.5, structure="2:4", importance="uniform", method="sparsegpt"),
        PruningConfig(sparsity=0.3, prune_per_model=True, aggregate="avg"),
    ],
    ids=["zeroth_order", "first_order_layer", "sparsegpt_model", "magnitude", "2:4", "per_model_avg"],
)
def test_plain_module_with_a_module_list_of_blocks(toy_model, config):
    batches = toy_batches(4)
    before = snapshot(toy_model)
    result = prune(toy_model, batches, toy_loss, config)
    assert list(result.towers) == ["layers"]
    assert set(result.masks) == {f"layers.{i}.{fc}.weight" for i in range(3) for fc in ("fc1", "fc2")}
    expected_groups = {"block": 3, "layer": 6, "model": 1}[config.granularity]
    assert len(result.groups) == expected_groups
    parameters = dict(toy_model.named_parameters())
    for name, mask in result.masks.items():
        weight = parameters[name].detach()
        assert torch.all(weight[~mask] == 0), name
        if config.method != "sparsegpt":  # SparseGPT also updates the weights it keeps
            assert torch.equal(weight, before[name].masked_fill(~mask, 0)), name
        if config.n_m is not None:
            assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(dim=2) == 2), name
    for name, tensor in before.items():
        if name not in result.masks:
            assert torch.equal(toy_model.state_dict()[name], tensor), name
    assert result.overall_sparsity == pytest.approx(config.sparsity, abs=1 / 16)


@pytest.mark.parametrize("family", ["blip2_opt", "blip2_t5"])
@pytest.mark.parametrize(
    ("method", "comparison"),
    [
        ("wanda", "per_row"),
        ("wanda", "per_matrix"),
        ("sparsegpt", "per_row"),
        ("sparsegpt", "per_matrix"),
        ("magnitude", "per_row"),
        ("magnitude", "per_matrix"),
    ],
)
def test_overall_sparsity_meets_the_target_to_one_weight_per_tensor(family, method, comparison):
    """Every tensor loses exactly round(numel · s), so the model's achieved sparsity is the target up to half a
    weight per tensor, for every local pruner and ranking (the floor of per-row counts used to lose ~1%)."""
    model, batches, loss_fn = family_case(family, batches=1, size=2)
    config = PruningConfig(sparsity=0.55, importance="uniform", method=method, comparison=comparison, fine_samples=2)
    result = prune(model, batches, loss_fn, config)
    pruned = {name: int((~mask).sum()) for name, mask in result.masks.items()}
    assert pruned == {name: round(mask.numel() * 0.55) for name, mask in result.masks.items()}
    total = sum(result.sizes.values())
    assert abs(sum(pruned.values()) - 0.55 * total) <= 0.5 * len(pruned)
    if comparison == "per_row":
        for name, mask in result.masks.items():
            per_row = (~mask).sum(dim=1)
            assert int(per_row.max() - per_row.min()) <= 1, name
