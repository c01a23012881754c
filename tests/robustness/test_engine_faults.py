"""Bad inputs and faults given to the engine (``ecoflap_pl.pruning``): each is refused with a message naming the
problem, or handled correctly, and a refused run leaves every weight bit-identical (see ``CASES.md``)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from ecoflap_pl.pruning import GroupScores, PruningConfig, prune, score_groups
from tests.pruning.pruning_helpers import (
    OpaqueWeight,
    assert_bit_identical,
    seeded_toy_model,
    snapshot,
    toy_batches,
    toy_loss,
)

CONFIG = {"coarse_samples": 8, "fine_samples": 8}


def fc_weights(model: nn.Module) -> list[torch.Tensor]:
    return [
        param
        for name, param in model.named_parameters()
        if name.startswith("layers.") and name.endswith("weight") and param.ndim == 2
    ]


def zero_fraction(model: nn.Module) -> float:
    weights = fc_weights(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def refused(model, error, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        prune(model, *args, **kwargs)
    assert_bit_identical(model, before)


# --- a model that is already pruned (0.5, then 0.3 or 0.7): accounted, never under-reported ---------------------------


@pytest.mark.parametrize("second", [0.3, 0.7])
def test_pruning_a_pruned_model_reports_the_true_sparsity(second, caplog):
    model = seeded_toy_model()
    prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, importance="uniform", **CONFIG))
    first_zeros = [w == 0 for w in fc_weights(model)]
    with caplog.at_level(logging.WARNING, logger="ecoflap_pl.pruning"):
        result = prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=second, importance="uniform", **CONFIG))
    assert "already zero before pruning" in caplog.text
    assert result.prior_sparsity == pytest.approx(0.5, abs=0.02)
    assert result.overall_sparsity == pytest.approx(zero_fraction(model), abs=1e-9)  # the report is the truth
    assert result.overall_sparsity == pytest.approx(max(0.5, second), abs=0.02)
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.equal(~mask, params[name] == 0), name  # every zero is masked, so fine-tuning keeps it at zero
    for was_zero, weight in zip(first_zeros, fc_weights(model), strict=True):
        assert bool((weight[was_zero] == 0).all())  # the first pruning is never undone


def _pruned_before() -> nn.Module:
    model = seeded_toy_model()
    prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, importance="uniform", **CONFIG))
    return model


def _flat_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["inputs"]).sum() * 0 + 1.0  # no gradient anywhere: every score is 0


@pytest.mark.parametrize(
    ("model", "loss", "settings", "warning"),
    [
        (_pruned_before, toy_loss, {"importance": "uniform"}, "already zero before pruning"),
        (seeded_toy_model, toy_loss, {"eps": 1e-12}, "saw no change of the loss"),
        (seeded_toy_model, _flat_loss, {}, "Every group score is 0"),
        (OpaqueWeight, toy_loss, {}, "Prefix reuse and batched probes do not apply to this model"),
    ],
    ids=["pruned-before", "probes-below-precision", "all-zero-scores", "fast-path-fallback"],
)
def test_the_engine_s_warnings_are_said_on_rank_0_only(model, loss, settings, warning, caplog):
    """Every rank of a DDP run prunes the same model with the same settings: each said the engine's warnings."""
    for rank in (0, 1):
        torch.manual_seed(0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ecoflap_pl.pruning"):
            config = PruningConfig(sparsity=0.5, **{**CONFIG, **settings})
            prune(model(), toy_batches(2), loss, config, rank=rank, world_size=2)
            assert logging.getLogger("ecoflap_pl.pruning").level == logging.WARNING  # the caller's level, restored
        assert (warning in caplog.text) is (rank == 0), (rank, caplog.text)


def test_dense_model_reports_no_prior_sparsity():
    result = prune(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(importance="uniform", **CONFIG))
    assert result.prior_sparsity == 0.0
    assert result.to_dict()["prior_sparsity"] == 0.0


# --- reused scores computed with other settings or for another model ------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"eps": 1e-2}, "eps (0.01 in the scores, 0.001 now)"),
        ({"probes": 2}, "probes (2 in the scores, 1 now)"),
        ({"seed": 1}, "seed (1 in the scores, 0 now)"),
        ({"coarse_samples": 4}, "coarse_samples (4 in the scores, 8 now)"),
    ],
)
def test_scores_from_other_settings_are_refused(changed, named):
    scores = score_groups(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(**{**CONFIG, **changed}))
    refused(
        seeded_toy_model(),
        ValueError,
        named.replace("(", r"\(").replace(")", r"\)"),
        toy_batches(2),
        toy_loss,
        PruningConfig(**CONFIG),
        scores=scores,
    )


def test_scores_from_another_model_are_refused():
    other = seeded_toy_model()
    other.layers[0].fc1 = nn.Linear(16, 24)  # same names, another shape
    other.layers[0].fc2 = nn.Linear(24, 16)
    scores = score_groups(other, toy_batches(2), toy_loss, PruningConfig(**CONFIG))
    refused(
        seeded_toy_model(),
        ValueError,
        "another model: other weight names or shapes",
        toy_batches(2),
        toy_loss,
        PruningConfig(**CONFIG),
        scores=scores,
    )


def test_scores_survive_a_json_round_trip():
    scores = score_groups(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(**CONFIG))
    again = GroupScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    result = prune(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(**CONFIG), scores=again)
    assert result.overall_sparsity == pytest.approx(0.5, abs=0.03)


# --- losses that cannot be scored -----------------------------------------------------------------------------------


def test_eps_so_large_the_loss_is_nan_blames_eps():
    def fragile_loss(model, batch):  # finite near the weights, NaN once they move far (an overflow in a real model)
        logits = model(batch["inputs"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return loss if float(logits.abs().max()) < 1e3 else loss * float("nan")

    refused(
        seeded_toy_model(),
        FloatingPointError,
        r"perturbed by eps=1000 .* HINT: lower `eps`",
        toy_batches(2),
        fragile_loss,
        PruningConfig(eps=1e3, **CONFIG),
    )


def test_nan_weights_are_named_not_blamed_on_the_data():
    model = seeded_toy_model()
    with torch.no_grad():
        model.layers[1].fc2.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"weight 'layers\.1\.fc2\.weight' already holds NaN"):
        prune(model, toy_batches(2), toy_loss, PruningConfig(**CONFIG))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True)


def test_nan_in_one_batch_names_the_batch():
    batches = toy_batches(3)
    batches[1]["inputs"][0, 0, 0] = float("nan")
    refused(
        seeded_toy_model(),
        FloatingPointError,
        "calibration batch 1",
        batches,
        toy_loss,
        PruningConfig(importance="first_order", **CONFIG),
    )


@pytest.mark.parametrize("importance", ["first_order", "gradient_norm"])
def test_back_propagation_with_a_loss_that_does_not_require_grad(importance):
    def detached_loss(model, batch):
        with torch.no_grad():
            return toy_loss(model, batch)

    refused(
        seeded_toy_model(),
        ValueError,
        rf"importance='{importance}' back-propagates .* does not require grad .* importance='zeroth_order'",
        toy_batches(2),
        detached_loss,
        PruningConfig(importance=importance, **CONFIG),
    )


@pytest.mark.parametrize("importance", ["zeroth_order", "first_order", "uniform"])
def test_one_calibration_batch_of_another_shape_is_named(importance):
    batches = toy_batches(3)
    batches[2] = {"inputs": torch.randn(4, 6, 5), "labels": batches[2]["labels"]}  # 5 features instead of 8
    refused(
        seeded_toy_model(),
        RuntimeError,
        r"calibration batch 2 \(inputs \(4, 6, 5\), labels \(4,\)\).* HINT: when only some batches fail, check that "
        "they are shaped like the others",
        batches,
        toy_loss,
        PruningConfig(importance=importance, coarse_samples=12, fine_samples=12),
    )


@pytest.mark.parametrize(
    ("moved", "said"),
    [
        (lambda inputs: inputs.to("meta"), r"the batch holds inputs on meta, the model's weights are on cpu: .* move "),
        (lambda inputs: inputs.double(), r"the batch holds inputs torch.float64, the model's weights are torch.float"),
    ],
    ids=["device", "dtype"],
)
@pytest.mark.parametrize("importance", ["zeroth_order", "uniform"])
def test_one_calibration_batch_on_another_device_or_of_another_dtype_is_named(moved, said, importance):
    """A batch left on another device than the model (the engine uses the batches as given), or of another dtype
    than a model that does not cast its inputs: the hint asked to check the batches' shapes."""
    batches = toy_batches(3)
    batches[2] = {"inputs": moved(batches[2]["inputs"]), "labels": batches[2]["labels"]}
    refused(
        seeded_toy_model(),
        RuntimeError,
        rf"calibration batch 2 \(inputs \(4, 6, 8\), labels \(4,\)\): .* HINT: {said}",
        batches,
        toy_loss,
        PruningConfig(importance=importance, coarse_samples=12, fine_samples=12),
    )


@pytest.mark.parametrize("importance", ["zeroth_order", "first_order", "gradient_norm", "uniform"])
def test_a_loss_that_pops_from_the_batch_prunes_as_one_that_reads_it(importance):
    """``labels = batch.pop("labels")`` in ``loss_fn`` (the Hugging Face Trainer's ``compute_loss`` recipe): the
    first pass took the labels out of the user's calibration batch, and the next one ended in a bare
    ``KeyError: 'labels'``. Each call now gets a copy of the batch's dict, and the batches are left as given."""

    def popping_loss(model, batch):
        labels = batch.pop("labels")
        return nn.functional.cross_entropy(model(batch.pop("inputs")), labels)

    config = PruningConfig(importance=importance, method="sparsegpt", sparsity=0.5, **CONFIG)
    reference = seeded_toy_model()
    prune(reference, toy_batches(2), toy_loss, config)
    model, batches = seeded_toy_model(), toy_batches(2)
    prune(model, batches, popping_loss, config)
    assert [sorted(batch) for batch in batches] == [["inputs", "labels"]] * 2
    for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(param, expected), name


def test_a_loss_that_is_not_a_scalar():
    refused(
        seeded_toy_model(),
        TypeError,
        "must return a scalar tensor",
        toy_batches(2),
        lambda model, batch: model(batch["inputs"]),
        PruningConfig(**CONFIG),
    )


def test_no_calibration_batches():
    refused(seeded_toy_model(), ValueError, "non-empty sequence of batches", [], toy_loss, PruningConfig(**CONFIG))


def test_a_loss_that_does_not_run_the_model():
    refused(
        seeded_toy_model(),
        RuntimeError,
        "None of the stacks of blocks",
        toy_batches(2),
        lambda model, batch: torch.tensor(1.0, requires_grad=True),
        PruningConfig(**CONFIG),
    )


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_the_fine_step_restores_every_weight(interrupt):
    def progress(stage, done, total):
        if stage == "fine" and done == 2:
            raise interrupt()

    refused(seeded_toy_model(), interrupt, None, toy_batches(2), toy_loss, PruningConfig(**CONFIG), progress=progress)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"sparsity": 1.0}, "`sparsity` must be in"),
        ({"sparsity": 0.5, "max_sparsity": 0.4}, "`max_sparsity` must be in"),
        ({"structure": "2:4", "sparsity": 0.5}, "`importance` must be 'uniform'"),
        ({"structure": "4:2"}, "0 < N < M"),
        ({"coarse_samples": 0}, "`coarse_samples` must be a positive integer"),
        ({"eps": 0.0}, "`eps` must be > 0"),
        ({"include": []}, "`include` must name at least one pattern"),
        ({"method": "wandaa"}, r"`method` must be one of \['wanda', 'sparsegpt', 'magnitude'\]"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(setting, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**setting)


def test_patterns_that_select_nothing():
    refused(
        seeded_toy_model(),
        ValueError,
        "nothing",
        toy_batches(2),
        toy_loss,
        PruningConfig(include=("nothing.*",), **CONFIG),
    )


def test_running_out_of_memory_keeps_its_type():
    calls = 0

    def loss_running_out(model, batch):
        nonlocal calls
        calls += 1
        if calls == 3:  # in the coarse step, after discovery
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return toy_loss(model, batch)

    refused(
        seeded_toy_model(),
        torch.OutOfMemoryError,
        "out of memory",
        toy_batches(2),
        loss_running_out,
        PruningConfig(**CONFIG),
    )


# --- fewer calibration samples than the config asks for: one warning naming the cause and the fix ---------------------


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_short_calibration_set_is_one_warning_naming_the_options_to_lower(caplog):
    config = PruningConfig(sparsity=0.5, coarse_samples=50, fine_samples=100)
    with caplog.at_level(logging.WARNING, logger="ecoflap_pl"):
        prune(seeded_toy_model(), toy_batches(2), toy_loss, config)  # 2 batches of 4: 8 samples
    assert _warnings(caplog) == [
        "Only 8 calibration samples were given, but `coarse_samples` is 50 and `fine_samples` is 100: both steps use "
        "all 8. HINT: lower `coarse_samples` and `fine_samples` to 8, or give more calibration samples."
    ]


def test_a_short_calibration_set_names_only_the_step_it_shortens(caplog):
    config = PruningConfig(sparsity=0.5, coarse_samples=4, fine_samples=100)
    with caplog.at_level(logging.WARNING, logger="ecoflap_pl"):
        prune(seeded_toy_model(), toy_batches(2), toy_loss, config)
        score_groups(seeded_toy_model(), toy_batches(2), toy_loss, config)  # the coarse step has its 4
    assert _warnings(caplog) == [
        "Only 8 calibration samples were given, but `fine_samples` is 100: the fine step uses all 8. HINT: lower "
        "`fine_samples` to 8, or give more calibration samples."
    ]


@pytest.mark.parametrize("allocation", ["owl", "uniform"])
def test_an_allocation_that_reads_no_scores_is_not_warned_of_a_coarse_step(caplog, allocation):
    """OWL and the uniform allocation never run the coarse step, but a set shorter than `coarse_samples` was warned
    that "the coarse step uses all 8" (and checked against the ranks for that step)."""
    config = PruningConfig(sparsity=0.5, coarse_samples=50, fine_samples=8, allocation=allocation)
    assert not config.scores_groups and config.calibration_samples == 8
    with caplog.at_level(logging.WARNING, logger="ecoflap_pl"):
        result = prune(seeded_toy_model(), toy_batches(2), toy_loss, config)
    assert _warnings(caplog) == [] and "coarse" not in result.stages


def test_a_short_held_out_set_of_auto_is_one_warning(caplog):
    config = PruningConfig(sparsity=0.5, coarse_samples=4, fine_samples=4, allocation="auto")
    with caplog.at_level(logging.WARNING, logger="ecoflap_pl"):
        prune(seeded_toy_model(), toy_batches(3), toy_loss, config)  # 12 samples: 4 leading, 8 held out of 16
    assert _warnings(caplog) == [
        "Only 12 calibration samples were given, but the run asks for 20: allocation 'auto' holds out the 8 left "
        "after the 4 of the coarse and fine steps, not `auto_holdout_samples` (16). HINT: lower `auto_holdout_samples` "
        "to 8, or give more calibration samples."
    ]


def test_a_short_calibration_set_is_reported_by_rank_0_only(caplog):
    config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=100)

    def two_equal_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return 2 * tensor

    with caplog.at_level(logging.WARNING, logger="ecoflap_pl"):
        for rank in (0, 1):  # every rank holds the same batches
            prune(
                seeded_toy_model(),
                toy_batches(2),
                toy_loss,
                config,
                rank=rank,
                world_size=2,
                all_reduce=two_equal_ranks,
            )
    assert len(_warnings(caplog)) == 1
