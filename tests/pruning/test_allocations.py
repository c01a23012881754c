"""The allocation strategies: registry, OWL against a hand computation, from_report round trip, auto's choice."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.allocation import (
    Allocation,
    allocation_names,
    get_allocation,
    owl_sparsity,
    register_allocation,
    registry,
)
from ecoflap_pl.reporting import report_dict, write_report
from tests.pruning.pruning_helpers import (
    assert_bit_identical,
    seeded_toy_model,
    snapshot,
    toy_batches,
    toy_linear_inputs,
    toy_loss,
)

SIZE = 1024  # parameters of one ToyBlock of width 16 (fc1 16x32 + fc2 32x16)


def outlier_model():
    """The toy model with some large weights planted, so that the blocks have different outlier ratios."""
    model = seeded_toy_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for index, planted in ((0, 4), (1, 40), (2, 12)):
            weight = model.layers[index].fc1.weight
            rows = torch.randint(0, weight.shape[0], (planted,), generator=generator)
            cols = torch.randint(0, weight.shape[1], (planted,), generator=generator)
            weight[rows, cols] *= 25
    return model


def hand_outlier_ratios(model, batches, m):
    """Dense forward written out: Σx² of every Linear input over all tokens, A = |W|·‖X‖, outliers per block."""
    ratios = {}
    with torch.no_grad():
        for index, linears in toy_linear_inputs(model, batches):
            metrics = []
            for _, linear, inputs in linears:
                sq_sums = torch.zeros(linear.in_features)
                for x in inputs:
                    for token in x.reshape(-1, linear.in_features):
                        sq_sums += token.square()
                metrics.append(linear.weight.abs() * sq_sums.sqrt())
            entries = torch.cat([metric.flatten() for metric in metrics]).double()
            ratios[f"layers.{index}"] = int((entries > m * entries.mean()).sum()) / entries.numel()
    return ratios


def band_with_shift(ratios, sizes, sparsity, spread):
    """The documented rule by an active set instead of bisection: map D onto [p − λ, p + λ], then repeatedly solve
    the size-weighted budget for the shift with the clipped groups held at the band's edge."""
    least, most = min(ratios.values()), max(ratios.values())
    start = {g: sparsity + spread - 2 * spread * (d - least) / (most - least) for g, d in ratios.items()}
    low, high = sparsity - spread, sparsity + spread
    clipped: dict[str, float] = {}
    while True:
        free = [g for g in start if g not in clipped]
        budget = sparsity * sum(sizes.values()) - sum(sizes[g] * s for g, s in clipped.items())
        shift = (budget - sum(sizes[g] * start[g] for g in free)) / sum(sizes[g] for g in free)
        outside = {g: min(max(start[g] + shift, low), high) for g in free if not low <= start[g] + shift <= high}
        if not outside:
            return {**clipped, **{g: start[g] + shift for g in free}}
        clipped.update(outside)


def kept(sparsity, sizes):
    return sum(round(sizes[g] * (1 - s)) for g, s in sparsity.items())


def test_owl_ratios_and_sparsities_equal_a_hand_computation():
    model, batches = outlier_model(), toy_batches(4)
    expected_ratios = hand_outlier_ratios(model, batches, m=3.0)
    assert len(set(expected_ratios.values())) == 3  # the planted weights make the blocks differ
    config = PruningConfig(sparsity=0.6, allocation="owl", owl_m=3.0, owl_lambda=0.1, fine_samples=16)
    result = prune(model, batches, toy_loss, config)

    assert result.group_outlier_ratios == pytest.approx(expected_ratios, abs=1.5 / SIZE)
    sizes = dict.fromkeys(expected_ratios, SIZE)
    expected = band_with_shift(expected_ratios, sizes, 0.6, 0.1)
    assert result.group_sparsity == pytest.approx(expected, abs=1 / SIZE)
    assert kept(result.group_sparsity, sizes) == round(3 * SIZE * 0.4)  # the exact budget
    assert all(0.5 - 1 / SIZE <= s <= 0.7 + 1 / SIZE for s in result.group_sparsity.values())  # the band
    most = max(expected_ratios, key=expected_ratios.__getitem__)
    assert result.group_sparsity[most] == min(result.group_sparsity.values())  # more outliers, lower sparsity
    assert result.overall_sparsity == pytest.approx(0.6, abs=3 / (3 * SIZE))
    # forward only: a plain capture of the first batch, then one capture per batch (the stand_in comparison)
    assert "coarse" not in result.stages and result.stages["outliers"].full_forwards == 1 + 4


def test_owl_with_equal_blocks_and_no_clipping_is_the_reference_rule():
    """Keep ratios 2λ·(D − min)/(max − min), shifted to mean 1 − p (the reference), when that stays in the band."""
    ratios, sizes = {"a": 0.01, "b": 0.03, "c": 0.05}, dict.fromkeys("abc", 10_000)
    normalised = {g: (d - 0.01) / 0.04 * 2 * 0.08 for g, d in ratios.items()}
    mean = sum(normalised.values()) / 3
    reference = {g: 1 - (k - mean + (1 - 0.7)) for g, k in normalised.items()}
    assert owl_sparsity(ratios, sizes, 0.7, 0.08) == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_meets_the_size_weighted_budget_and_the_band_with_unequal_towers(sparsity):
    ratios = {"vit.0": 0.001, "vit.1": 0.004, "lm.0": 0.02, "lm.1": 0.012, "lm.2": 0.009}
    sizes = {"vit.0": 300, "vit.1": 300, "lm.0": 5000, "lm.1": 5000, "lm.2": 4001}
    allocation = owl_sparsity(ratios, sizes, sparsity, 0.1)
    assert kept(allocation, sizes) == round(sum(sizes.values()) * (1 - sparsity))
    for group, value in allocation.items():
        assert sparsity - 0.1 - 1 / sizes[group] <= value <= sparsity + 0.1 + 1 / sizes[group], group
    order = sorted(ratios, key=ratios.__getitem__)
    assert [allocation[g] for g in order] == sorted(allocation.values(), reverse=True)
    assert allocation == pytest.approx(band_with_shift(ratios, sizes, sparsity, 0.1), abs=1 / 300)
    equal = owl_sparsity(dict.fromkeys(sizes, 0.01), sizes, sparsity, 0.1)
    assert equal == pytest.approx(dict.fromkeys(sizes, sparsity), abs=1 / 300)


def test_from_report_round_trip(tmp_path):
    """prune -> write_report -> prune a fresh copy with from_report: identical group sparsities (here handed from
    ECoFLaP + Wanda to SparseGPT, the official code's use)."""
    batches = toy_batches(4)
    first = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(sparsity=0.6, fine_samples=8, coarse_samples=8))
    paths = write_report(first, tmp_path)
    config = PruningConfig(
        sparsity=0.6, allocation="from_report", allocation_report=str(paths["json"]), method="sparsegpt"
    )
    second = prune(seeded_toy_model(), batches, toy_loss, config)
    assert second.group_sparsity == first.group_sparsity
    assert second.target_sparsity == first.target_sparsity
    assert "coarse" not in second.stages  # nothing scored again


def test_from_report_refuses_other_groups_and_leaves_the_model_alone(tmp_path):
    batches = toy_batches(2)
    first = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(importance="uniform", granularity="layer"))
    path = write_report(first, tmp_path)["json"]
    model = seeded_toy_model()
    before = snapshot(model)
    calls = []

    def counted_loss(model, batch):
        calls.append(batch)
        return toy_loss(model, batch)

    with pytest.raises(ValueError, match=r"made for other groups \(granularity 'layer'.*HINT: reuse a report"):
        prune(model, batches, counted_loss, PruningConfig(allocation="from_report", allocation_report=str(path)))
    assert_bit_identical(model, before)
    with pytest.raises(ValueError, match=r"overall sparsity of 0\.5000, but `sparsity` is 0\.6.*sparsity: 0\.5"):
        prune(
            model,
            batches,
            counted_loss,
            PruningConfig(sparsity=0.6, granularity="layer", allocation="from_report", allocation_report=str(path)),
        )
    assert_bit_identical(model, before)
    assert calls == []  # both refused before the first forward (they were found after it, at allocation)
    with pytest.raises(FileNotFoundError, match=r"`allocation_report` '.*missing.json' is not a file"):
        prune(model, batches, toy_loss, PruningConfig(allocation="from_report", allocation_report="missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"overall_sparsity": 0.5}))
    with pytest.raises(ValueError, match=r"is not a pruning report: it lacks \['groups', 'group_sparsity'"):
        prune(
            model,
            batches,
            toy_loss,
            PruningConfig(allocation="from_report", allocation_report=str(tmp_path / "other.json")),
        )
    assert_bit_identical(model, before)


def _moved_budget(report):
    """Two groups' sparsities moved apart by 0.7, out of [0, 1), while the size-weighted total stays the same."""
    first, second = list(report["group_sparsity"])[:2]
    report["group_sparsity"][first] += 0.7
    report["group_sparsity"][second] -= 0.7


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda report: report.update(groups=list(report["groups"])), "`groups` must map each group"),
        (lambda report: report.update(config="block"), "`config` must be a mapping"),
        (lambda report: report["group_sparsity"].pop("layers.1"), r"a sparsity for each of its 3 groups.*layers\.1"),
        (lambda report: report["group_sparsity"].update({"layers.1": "0.6"}), r"number in \[0, 1\), got layers\.1"),
        (lambda report: report["group_sparsity"].update({"layers.1": float("nan")}), "layers.1: nan"),
        (_moved_budget, r"number in \[0, 1\), got layers\.0: 1\.3.*layers\.1: -0\.0"),
    ],
    ids=["groups-a-list", "config-a-string", "a-group-missing", "a-string", "nan", "out-of-range-same-total"],
)
def test_from_report_refuses_an_edited_or_damaged_report_and_leaves_the_model_alone(tmp_path, damage, named):
    """Each was a bare AttributeError / KeyError, or (out of range, same total) pruned a block to 100% while the
    result claimed the target sparsity."""
    batches = toy_batches(2)
    report = report_dict(prune(seeded_toy_model(), batches, toy_loss, PruningConfig(sparsity=0.6, fine_samples=8)))
    damage(report)
    path = tmp_path / "pruning_report.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    model = seeded_toy_model()
    before = snapshot(model)
    config = PruningConfig(sparsity=0.6, allocation="from_report", allocation_report=str(path))
    with pytest.raises(ValueError, match=rf"is not a valid pruning report: .*{named}.*HINT: use the pruning_report"):
        prune(model, batches, toy_loss, config)
    assert_bit_identical(model, before)


def lopsided_model():
    """Blocks 0 and 2 barely touch the residual stream (weights x 0.01), block 1 carries everything: pruning the
    quiet blocks costs nothing, so the best allocation puts as much sparsity on them as its cap allows."""
    model = seeded_toy_model()
    with torch.no_grad():
        for index in (0, 2):
            model.layers[index].fc1.weight.mul_(0.01)
            model.layers[index].fc2.weight.mul_(0.01)
    return model


def heldout_loss(model, batches):
    with torch.no_grad():
        return sum(float(toy_loss(model, b)) * len(b["labels"]) for b in batches) / sum(
            len(b["labels"]) for b in batches
        )


def test_auto_keeps_the_candidate_with_the_lowest_heldout_loss(tmp_path):
    batches = toy_batches(6)  # 2 coarse+fine batches of 4 samples, then 4 held-out ones (auto_holdout_samples=16)
    config = PruningConfig(
        sparsity=0.5, allocation="auto", coarse_samples=8, fine_samples=8, auto_holdout_samples=16, owl_m=3.0
    )
    model = lopsided_model()
    result = prune(model, batches, toy_loss, config)

    names = [candidate.name for candidate in result.candidates]
    assert names == [
        "uniform",
        "ecoflap(max_sparsity=0.55)",
        "ecoflap(max_sparsity=0.6)",
        "ecoflap(max_sparsity=0.7)",
        "owl(lambda=0.04)",
        "owl(lambda=0.08)",
        "owl(lambda=0.12)",
    ]
    losses = {candidate.name: candidate.heldout_loss for candidate in result.candidates}
    assert result.chosen_candidate == min(losses, key=losses.__getitem__)
    chosen = next(c for c in result.candidates if c.name == result.chosen_candidate)
    assert result.group_sparsity == chosen.group_sparsity
    assert heldout_loss(model, batches[2:]) == pytest.approx(losses[result.chosen_candidate], rel=1e-6)

    # Every reported loss is that of the candidate's allocation, pruned on its own and measured on the held-out
    # batches only (a candidate's allocation replayed through from_report on a fresh copy).
    for candidate in result.candidates[:2]:
        report = {**result.to_dict(), "group_sparsity": candidate.group_sparsity}
        path = tmp_path / f"{candidate.name}.json"
        path.write_text(json.dumps(report))
        replay = lopsided_model()
        prune(
            replay,
            batches,
            toy_loss,
            PruningConfig(fine_samples=8, allocation="from_report", allocation_report=str(path)),
        )
        assert heldout_loss(replay, batches[2:]) == pytest.approx(candidate.heldout_loss, rel=1e-6), candidate.name

    assert result.stages["auto"].full_forwards > 0 and result.search_cost_ratio > 1
    again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.candidates == result.candidates and again.chosen_candidate == result.chosen_candidate


def test_auto_finds_the_allocation_known_to_be_best():
    """Blocks 0 and 2 are all zeros (pruning them changes nothing), block 1 does all the work and the loss is the
    distance to the dense outputs: the lower block 1's sparsity, the lower the loss. OWL sees outliers only in block
    1, so the widest band (λ = 0.12) gives it the lowest sparsity and must win; uniform must lose."""

    def one_block_model():
        model = seeded_toy_model()
        with torch.no_grad():
            for index in (0, 2):
                model.layers[index].fc1.weight.zero_()
                model.layers[index].fc2.weight.zero_()
        return model

    def distance_to_dense(model, batch):
        return (model(batch["inputs"]) - batch["targets"]).square().mean()

    batches = toy_batches(6)
    dense = one_block_model()
    with torch.no_grad():
        for batch in batches:
            batch["targets"] = dense(batch["inputs"])
    config = PruningConfig(
        sparsity=0.8, importance="uniform", allocation="auto", fine_samples=8, auto_holdout_samples=16, owl_m=2.0
    )
    result = prune(one_block_model(), batches, distance_to_dense, config)
    assert [c.name for c in result.candidates] == [
        "uniform",
        "owl(lambda=0.04)",
        "owl(lambda=0.08)",
        "owl(lambda=0.12)",
    ]
    assert result.chosen_candidate == "owl(lambda=0.12)"
    losses = [c.heldout_loss for c in result.candidates]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.7 * losses[0]
    assert result.group_sparsity["layers.1"] == pytest.approx(0.68, abs=1 / SIZE)
    target = sum(result.target_sparsity[n] * result.sizes[n] for n in result.sizes) / sum(result.sizes.values())
    assert target == pytest.approx(0.8, abs=1e-3)  # the allocation meets the budget exactly
    # Blocks 0 and 2 were all zeros before the run: they stay pruned and the achieved sparsity counts them.
    assert result.prior_sparsity == pytest.approx(2 / 3)
    assert result.overall_sparsity > target


def test_auto_with_sparsegpt_compares_with_wanda_and_prunes_with_sparsegpt():
    batches = toy_batches(4)
    config = PruningConfig(
        sparsity=0.5,
        allocation="auto",
        method="sparsegpt",
        importance="uniform",
        fine_samples=8,
        auto_holdout_samples=8,
    )
    model = lopsided_model()
    before = snapshot(model)
    result = prune(model, batches, toy_loss, config)
    assert [c.name for c in result.candidates][0] == "uniform"
    assert not any(c.name.startswith("ecoflap") for c in result.candidates)  # importance uniform: no scores
    weight = model.layers[1].fc1.weight
    mask = result.masks["layers.1.fc1.weight"]
    assert not torch.equal(weight[mask], before["layers.1.fc1.weight"][mask])  # SparseGPT updated the kept weights


def test_auto_failing_on_a_heldout_batch_leaves_the_model_bit_identical():
    batches = toy_batches(3)
    batches[2]["inputs"][1, 2, 3] = float("nan")  # only the held-out batch is broken
    model = lopsided_model()
    before = snapshot(model)
    config = PruningConfig(sparsity=0.5, allocation="auto", coarse_samples=8, fine_samples=8, auto_holdout_samples=4)
    with pytest.raises(FloatingPointError, match="calibration batch 2"):
        prune(model, batches, toy_loss, config)
    assert_bit_identical(model, before)


def test_auto_interrupted_between_candidates_leaves_the_model_bit_identical():
    batches = toy_batches(3)
    seen = []

    def interrupting_loss(model, batch):
        if batch["inputs"] is batches[2]["inputs"]:  # loss_fn gets a copy of the dict, holding the same tensors
            seen.append(1)
            if len(seen) == 3:  # during the third candidate's held-out loss
                raise KeyboardInterrupt
        return toy_loss(model, batch)

    model = lopsided_model()
    before = snapshot(model)
    config = PruningConfig(sparsity=0.5, allocation="auto", coarse_samples=8, fine_samples=8, auto_holdout_samples=4)
    with pytest.raises(KeyboardInterrupt):
        prune(model, batches, interrupting_loss, config)
    assert_bit_identical(model, before)


def test_auto_reports_progress_inside_each_candidate_so_a_stop_request_is_honoured_there():
    """The callback turns SIGTERM into an exception raised from ``progress``: it must be called between the blocks of
    every candidate's trial, not only once the search is over."""
    batches = toy_batches(6)
    stages: list[str] = []

    def stop_in_the_second_candidate(stage, done, total):
        stages.append(stage)
        if stage.startswith("auto: ") and len({s for s in stages if s.startswith("auto: ")}) == 2:
            raise KeyboardInterrupt

    model = lopsided_model()
    before = snapshot(model)
    config = PruningConfig(sparsity=0.5, allocation="auto", coarse_samples=8, fine_samples=8, auto_holdout_samples=4)
    with pytest.raises(KeyboardInterrupt):
        prune(model, batches, toy_loss, config, progress=stop_in_the_second_candidate)
    assert_bit_identical(model, before)
    assert stages[-1] == "auto: ecoflap(max_sparsity=0.55)" and "fine" not in stages


def test_auto_refuses_before_any_work_when_no_batch_is_held_out():
    model = seeded_toy_model()
    before = snapshot(model)
    config = PruningConfig(allocation="auto", coarse_samples=8, fine_samples=8)
    with pytest.raises(ValueError, match=r"held-out calibration batches after the 2 .*HINT: pass 24 calibration"):
        prune(model, toy_batches(2), toy_loss, config)
    assert_bit_identical(model, before)


def test_a_registered_strategy_is_one_function_and_one_name(monkeypatch):
    monkeypatch.setattr(registry, "_STRATEGIES", registry._STRATEGIES.copy())

    @register_allocation("deeper_is_sparser")
    def deeper_is_sparser(request):
        groups = list(request.groups)
        return Allocation({g: 0.3 + 0.1 * i for i, g in enumerate(groups)})

    assert "deeper_is_sparser" in allocation_names()
    result = prune(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(allocation="deeper_is_sparser"))
    assert result.group_sparsity == pytest.approx({"layers.0": 0.3, "layers.1": 0.4, "layers.2": 0.5})
    with pytest.raises(ValueError, match="already registered"):
        register_allocation("owl")(deeper_is_sparser)
    with pytest.raises(ValueError, match=r"`allocation` must be one of \[.*'deeper_is_sparser'.*\], got 'nope'"):
        get_allocation("nope")


def test_all_zero_scores_warn_that_the_allocation_is_uniform(caplog):
    def flat_loss(model, batch):
        return model(batch["inputs"]).sum() * 0 + 1.0  # no gradient anywhere: every score is 0

    with caplog.at_level(logging.WARNING):
        result = prune(seeded_toy_model(), toy_batches(2), flat_loss, PruningConfig(coarse_samples=8))
    assert "Every group score is 0" in caplog.text
    assert set(result.group_sparsity.values()) == {0.5}
