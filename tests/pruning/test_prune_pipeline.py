"""prune()/score_groups() as a whole: determinism, reusable scores, progress, results that round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BatchEncoding

from ecoflap_pl import GroupScores, PruningConfig, PruningResult, prune, score_groups
from tests.pruning.pruning_helpers import family_case, seeded_toy_model, toy_batches, toy_loss


def masks_equal(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_same_seed_and_data_give_identical_masks_and_leave_the_global_rng_alone():
    batches = toy_batches(4)
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=16, seed=7)
    model = seeded_toy_model()
    rng_state = torch.random.get_rng_state()
    first = prune(model, batches, toy_loss, config)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    second = prune(seeded_toy_model(), batches, toy_loss, config)
    assert masks_equal(first.masks, second.masks)
    assert first.group_scores == second.group_scores and first.group_sparsity == second.group_sparsity

    other_seed = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(sparsity=0.5, coarse_samples=8, seed=8))
    assert all(other_seed.group_scores[g] != first.group_scores[g] for g in first.group_scores)


def test_scores_computed_once_allocate_like_a_fresh_run_for_several_sparsities():
    batches = toy_batches(4)
    base = {"coarse_samples": 8, "fine_samples": 16, "importance": "zeroth_order", "seed": 3}
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return toy_loss(model, batch)

    scores = score_groups(seeded_toy_model(), batches, toy_loss, PruningConfig(**base))
    for sparsity in (0.3, 0.5, 0.7):
        config = PruningConfig(sparsity=sparsity, **base)
        fresh = prune(seeded_toy_model(), batches, toy_loss, config)
        calls.clear()
        reused = prune(seeded_toy_model(), batches, counting_loss, config, scores=scores)
        # the discovery forward, one fine-step capture per batch and a plain one of the first batch: no re-scoring
        assert len(calls) == 1 + 1 + 4
        assert reused.group_scores == fresh.group_scores == scores.scores
        assert reused.group_sparsity == fresh.group_sparsity
        assert masks_equal(reused.masks, fresh.masks)
        assert reused.stages["coarse"] == scores.stats


def test_group_scores_round_trip_through_json_and_are_reused():
    config = PruningConfig(coarse_samples=8, fine_samples=8, exclude=("*fc2*",))
    scores = score_groups(seeded_toy_model(), toy_batches(2), toy_loss, config)
    restored = GroupScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert restored == scores
    assert restored.allocate(0.5, 0.6) == scores.allocate(0.5, 0.6)
    reused = prune(seeded_toy_model(), toy_batches(2), toy_loss, config, scores=restored)
    assert reused.group_scores == scores.scores


def test_result_round_trips_through_json_and_reports_costs():
    batches = toy_batches(4)
    # the reference loop: one full forward per probe
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=16, activation_storage="recompute")
    result = prune(seeded_toy_model(), batches, toy_loss, config)
    restored = PruningResult.from_dict(json.loads(json.dumps(result.to_dict())), masks=result.masks)
    assert restored == result and restored.masks is not result.masks and masks_equal(restored.masks, result.masks)

    assert set(result.stages) == {"discovery", "coarse", "fine"}
    assert result.stages["discovery"].full_forwards == 1
    assert result.stages["coarse"].full_forwards == 2 * 6 * 2  # 2 per probe x 6 tensors x 2 batches of 4
    assert result.stages["coarse"].backward_passes == 0
    # one (stopped) forward per batch to record the block calls, and a plain one of the first batch to compare with
    assert result.stages["fine"].full_forwards == 1 + 4
    # 3 blocks x 4 batches measured, and blocks 0 and 1 re-run pruned to feed the next block
    assert result.stages["fine"].block_forwards == 3 * 4 + 2 * 4
    assert all(stats.seconds > 0 and stats.peak_memory_bytes > 0 for stats in result.stages.values())
    assert result.tower_sparsity() == {"layers": pytest.approx(result.overall_sparsity)}


def test_progress_reports_every_unit_of_work():
    events = []
    prune(
        seeded_toy_model(),
        toy_batches(4),
        toy_loss,
        PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=16, activation_storage="recompute"),
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    assert [event for event in events if event[0] == "coarse"] == [("coarse", i, 6) for i in range(1, 7)]
    assert [event for event in events if event[0] == "fine"] == [("fine", i, 3) for i in range(1, 4)]


def test_samples_select_the_leading_batches():
    calls = []

    def recording_loss(model, batch):
        calls.append(batch["id"])
        return toy_loss(model, batch)

    batches = [{**batch, "id": index} for index, batch in enumerate(toy_batches(6))]
    prune(seeded_toy_model(), batches, recording_loss, PruningConfig(sparsity=0.5, coarse_samples=4, fine_samples=12))
    assert calls[0] == 0  # discovery
    assert set(calls[1:-3]) == {0}  # coarse: 4 samples = batch 0 only
    assert calls[-3:] == [0, 1, 2]  # fine: 12 samples = batches 0-2


@pytest.mark.parametrize(
    "as_batch",
    [
        lambda batch: BatchEncoding(batch),
        lambda batch: {"num_items_in_batch": torch.tensor(16), **batch},
    ],
    ids=["a tokenizer's BatchEncoding", "a 0-d tensor first"],
)
def test_samples_are_counted_in_a_tokenizer_s_batches(as_batch):
    """Batches of 4 samples as a Hugging Face tokenizer returns them (a ``BatchEncoding``, a ``UserDict`` and no
    dict), or with a 0-d count first: each was counted as one sample, so ``coarse_samples=8`` read 8 batches (32
    samples), every step read 4 times the samples asked, and the report said it had read 8."""
    model, batches, loss_fn = family_case("llama", batches=4, size=4)
    calls = []

    def recording_loss(model, batch):
        calls.append(batch["id"])
        return loss_fn(model, {"input_ids": batch["input_ids"]})

    given = [as_batch({**batch, "id": index}) for index, batch in enumerate(batches)]
    result = prune(model, given, recording_loss, PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8))
    assert set(calls) == {0, 1}
    assert result.stages["coarse"].samples == result.stages["fine"].samples == 8


def test_progress_ends_at_its_total_when_a_stack_has_nothing_to_prune():
    """BLIP-2's Q-Former is a stack of blocks that runs but is excluded: it is neither counted nor replayed."""
    model, batches, loss_fn = family_case("blip2_opt")
    events = []
    result = prune(
        model,
        batches,
        loss_fn,
        PruningConfig(importance="uniform", fine_samples=4),
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    blocks = sum(len(groups) for groups in result.towers.values())
    assert events == [("fine", i, blocks) for i in range(1, blocks + 1)]
    # the vision tower and the OPT decoder only (captures of every batch, a plain one of the first to compare with)
    assert result.stages["fine"].full_forwards == 2 * (1 + len(batches))


def test_the_info_lines_count_weight_matrices_and_weights_apart(caplog):
    """ "Found 6 weights to prune" and "Pruned 6 weights to 50.00% sparsity" counted the toy's 6 weight matrices, which
    hold 3,072 weights (CASES 238)."""
    model = seeded_toy_model()
    weights = sum(layer.fc1.weight.numel() + layer.fc2.weight.numel() for layer in model.layers)
    with caplog.at_level("INFO", logger="ecoflap_pl.pruning.pipeline"):
        result = prune(model, toy_batches(4), toy_loss, PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=16))
    matrices = 2 * len(model.layers)
    assert f"Found {matrices} weight matrices, {weights:,} weights to prune in" in caplog.text
    sparsity = f"{100 * result.overall_sparsity:.2f}%"
    assert f"Pruned {matrices} weight matrices to {sparsity} sparsity of their {weights:,} weights" in caplog.text
