"""The fine step's block replays with several calibration batches stacked into one call."""

from __future__ import annotations

import pytest
import torch

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.calls import BlockCall, merge_calls
from tests.pruning.pruning_helpers import family_case, seeded_toy_model, toy_batches, toy_loss


def replays_of(model, block_name, run):
    """How many times ``block_name`` is called while ``run()`` runs."""
    seen = []
    handle = model.get_submodule(block_name).register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(seen)


@pytest.mark.parametrize(
    ("family", "block"),
    [
        ("blip2_t5", "language_model.decoder.block.0"),  # position bias, cross-attention to the encoder
        ("llama", "model.layers.0"),  # rotary tables shared by the batches
        ("vilt", "vilt.encoder.layer.0"),  # two runs of the stack per forward
        ("eva", "blocks.0"),  # fused qkv through F.linear
        ("clip", "text_model.encoder.layers.0"),
    ],
)
def test_stacked_replays_give_the_masks_of_one_batch_per_replay(family, block):
    masks, runs = {}, {}
    for most in (1, 4):
        model, batches, loss_fn = family_case(family, batches=4, size=2)
        model = model.double()
        batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
        config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=8, fine_replay_batches=most)
        result = {}
        runs[most] = replays_of(model, block, lambda: result.update(r=prune(model, batches, loss_fn, config)))  # noqa: B023
        masks[most] = result["r"].masks
        assert result["r"].stages["fine"].block_forwards == prune_block_forwards(result["r"], family)
    assert masks[1].keys() == masks[4].keys()
    assert all(torch.equal(masks[1][name], masks[4][name]) for name in masks[1])
    calls = 2 if family == "vilt" else 1
    # discovery, a plain capture of the first batch, then one capture per batch (the stack's first block runs in all)
    forwards = 1 + 1 + 4
    # statistics + propagation: once per batch (per run) alone, once in all with four batches stacked
    assert runs[1] - forwards * calls == 2 * 4 * calls
    assert runs[4] - forwards * calls == 2 * calls


def prune_block_forwards(result, family):
    """Block forwards counted per calibration batch (and run), whatever the stacking: statistics and propagation of
    every block, but no propagation through the very last block (no later stack needs its outputs)."""
    calls = 2 if family == "vilt" else 1
    return 4 * calls * (2 * sum(len(tower) for tower in result.towers.values()) - 1)


def test_batches_of_different_lengths_are_replayed_alone():
    batches = toy_batches(4)
    batches[1] = {"inputs": batches[1]["inputs"][:, :4], "labels": batches[1]["labels"]}  # 4 tokens instead of 6
    stacked = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(importance="uniform", fine_samples=16))
    alone = prune(
        seeded_toy_model(),
        batches,
        toy_loss,
        PruningConfig(importance="uniform", fine_samples=16, fine_replay_batches=1),
    )
    assert all(torch.equal(stacked.masks[name], alone.masks[name]) for name in alone.masks)


def test_merge_calls_stacks_batch_tensors_and_shares_the_rest():
    hidden = [torch.randn(2, 3, 4), torch.randn(3, 3, 4)]
    bias = torch.randn(1, 2, 3, 3)
    calls = [BlockCall((None,), {"mask": torch.ones(n, 1, 3, 3), "bias": bias, "scale": 0.5}, 0, None) for n in (2, 3)]
    merged, state = merge_calls(calls, hidden)
    assert torch.equal(state, torch.cat(hidden))
    assert merged.kwargs["mask"].shape == (5, 1, 3, 3) and merged.kwargs["bias"] is bias
    assert merge_calls([calls[0], BlockCall((None,), {**calls[1].kwargs, "scale": 1.0}, 0, None)], hidden) is None
    assert merge_calls(calls, [hidden[0], torch.randn(3, 4, 4)]) is None


def tiny_gemma3(seed: int = 0):
    """A tiny random Gemma-3 text model with sliding-window and full-attention layers (window shorter than the
    sequences, so the two layer types get different masks and rotary tables)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        use_cache=True,
    )
    return Gemma3ForCausalLM(config).double().eval()


@pytest.mark.parametrize("padded", [False, True])
def test_stacked_replays_of_gemma3_give_the_masks_of_one_batch_per_replay(padded):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(4):
        input_ids = torch.randint(1, 64, (2, 8), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if padded:  # left padding, different in every batch: each sample's masks must stay with it when stacked
            attention_mask[0, : 1 + index] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids})

    def loss_fn(model, batch):
        return model(**batch).loss

    masks, runs = {}, {}
    for most in (1, 4):
        model = tiny_gemma3()
        config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=8, fine_replay_batches=most)
        result = {}
        runs[most] = replays_of(
            model,
            "model.layers.1",
            lambda: result.update(r=prune(model, batches, loss_fn, config)),  # noqa: B023
        )
        masks[most] = result["r"].masks
    assert masks[1].keys() == masks[4].keys() and masks[1]
    assert all(torch.equal(masks[1][name], masks[4][name]) for name in masks[1])
    assert runs[1] - runs[4] == 2 * (4 - 1)  # the stacked run replayed layer 1 once per pass, not once per batch
