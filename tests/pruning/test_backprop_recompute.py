"""Back-propagated importance with ``activation_storage: recompute``: every block checkpointed, same scores."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ecoflap_pl import PruningConfig, score_groups
from ecoflap_pl.pruning.block_outputs import stack_blocks
from tests.pruning.pruning_helpers import FAMILIES, assert_bit_identical, family_case, own_block_outputs, snapshot

ESTIMATORS = ("first_order", "gradient_norm")


def kept_and_scores(model, batches, loss_fn, config):
    """The scores, their stats, and the bytes autograd kept for backward outside checkpointed blocks (torch applies
    only the innermost saved-tensor hooks, so what a checkpoint keeps for itself is not seen here)."""
    kept = 0

    def pack(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scores = score_groups(model, batches, loss_fn, config)
    return scores, kept


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("importance", ESTIMATORS)
def test_recomputed_blocks_give_the_same_scores_keeping_less(family, importance):
    """On every engine family (T5's position bias passed between blocks, ViLT's stack run twice, CLIP's contrastive
    loss, timm's fused qkv): the same scores bit for bit, every block run once more during backward, less kept for
    backward, and the model as it was."""
    model, batches, loss_fn = family_case(family, batches=2, size=2)
    config = PruningConfig(sparsity=0.5, importance=importance, coarse_samples=4, probe_granularity="per_tensor")
    before = snapshot(model)
    kept_scores, kept = kept_and_scores(model, batches, loss_fn, config)
    recomputed, kept_recomputing = kept_and_scores(
        model, batches, loss_fn, replace(config, activation_storage="recompute")
    )
    assert recomputed.scores == kept_scores.scores
    assert kept_scores.stats.block_forwards == 0
    calls = own_block_outputs(model, list(stack_blocks(model).values()), batches, loss_fn)
    assert recomputed.stats.block_forwards == sum(map(len, calls)) > 0
    assert recomputed.stats.backward_passes == kept_scores.stats.backward_passes == len(batches)
    assert kept_recomputing < kept
    assert_bit_identical(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]


def test_an_error_in_a_recomputed_backward_leaves_the_model_as_it_was():
    """A loss that fails on the second batch: blocks unpatched, gradients and flags as before."""
    model, batches, loss_fn = family_case("llama", batches=2, size=2)
    model.lm_head.weight.requires_grad_(False)
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    seen = 0

    def failing(model, batch):
        nonlocal seen
        seen += 1
        if seen == 2:
            raise RuntimeError("calibration data ran out")
        return loss_fn(model, batch)

    config = PruningConfig(sparsity=0.5, importance="gradient_norm", coarse_samples=4, activation_storage="recompute")
    with pytest.raises(RuntimeError, match="calibration data ran out"):
        score_groups(model, batches, failing, config)
    assert_bit_identical(model, before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]
