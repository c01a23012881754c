"""One test per error message of the engine's entry points: each names the offending argument."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ecoflap_pl import PruningConfig, prune, score_groups
from tests.pruning.pruning_helpers import (
    ToyBlock,
    ToyModel,
    assert_bit_identical,
    family_case,
    seeded_toy_model,
    snapshot,
    toy_batches,
    toy_loss,
)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\) \(the fraction of zeros\), got"):
        PruningConfig(sparsity=sparsity)


def test_max_sparsity_below_sparsity():
    with pytest.raises(ValueError, match=r"`max_sparsity` must be in \[sparsity, 1\) = \[0.5, 1\), got 0.4"):
        PruningConfig(sparsity=0.5, max_sparsity=0.4)


def test_n_m_structure_not_matching_sparsity():
    with pytest.raises(ValueError, match=r"`structure` 2:4 keeps 2 of every 4 weights .* but `sparsity` is 0.6"):
        PruningConfig(sparsity=0.6, structure="2:4", importance="uniform")


def test_patterns_selecting_nothing(toy_model):
    before = snapshot(toy_model)
    config = PruningConfig(include=("encoder.*",), exclude=("*fc2*",))
    with pytest.raises(ValueError, match=r"`include`=\['encoder.\*'\] and `exclude`=\['\*fc2\*'\] select no weight"):
        prune(toy_model, toy_batches(1), toy_loss, config)
    assert_bit_identical(toy_model, before)


@pytest.mark.parametrize("batches", [[], ()])
def test_empty_calibration_data(toy_model, batches):
    with pytest.raises(ValueError, match=r"`calibration_batches` must be a non-empty sequence of batches"):
        prune(toy_model, batches, toy_loss, PruningConfig())


def test_calibration_data_that_is_not_a_sequence(toy_model):
    with pytest.raises(ValueError, match=r"`calibration_batches` must be a non-empty sequence.*got generator"):
        prune(toy_model, (batch for batch in toy_batches(1)), toy_loss, PruningConfig())


def test_model_without_discoverable_blocks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"`model` \(Sequential\) has no discoverable stack of transformer blocks"):
        prune(model, [torch.randn(2, 8)], lambda m, batch: m(batch).sum(), PruningConfig())


def test_model_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got dict"):
        prune({}, toy_batches(1), toy_loss, PruningConfig())


def test_config_that_is_not_a_pruning_config(toy_model):
    with pytest.raises(TypeError, match=r"`config` must be a PruningConfig, got dict"):
        prune(toy_model, toy_batches(1), toy_loss, {"sparsity": 0.5})


def test_loss_fn_that_is_not_callable(toy_model):
    with pytest.raises(TypeError, match=r"`loss_fn` must be callable as loss_fn\(model, batch\) -> Tensor"):
        prune(toy_model, toy_batches(1), "cross_entropy", PruningConfig())


def test_loss_fn_returning_no_scalar(toy_model):
    with pytest.raises(TypeError, match=r"`loss_fn` must return a scalar tensor, got Tensor of shape \(4, 5\)"):
        prune(toy_model, toy_batches(1), lambda model, batch: model(batch["inputs"]), PruningConfig())


@pytest.mark.parametrize(
    ("loss_fn", "said"),
    [
        (lambda model, batch: model(**batch, labels=batch["input_ids"]), r"got CausalLMOutputWithPast\. HINT: return "),
        (lambda model, batch: model(**batch), r"got CausalLMOutputWithPast\. HINT: .*loss is None without labels"),
        (lambda model, batch: model(**batch).loss, r"got NoneType\. HINT: .*loss is None without labels: pass"),
    ],
    ids=["the output", "the output without labels", "the loss without labels"],
)
def test_loss_fn_returning_a_model_output_or_no_loss_gets_a_hint(loss_fn, said):
    """A Hugging Face model's whole output, or its ``.loss`` computed without labels (None): the refusal named the
    type alone."""
    model, batches, _ = family_case("llama")
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"`loss_fn` must return a scalar tensor, {said}"):
        prune(model, batches, loss_fn, PruningConfig())
    assert_bit_identical(model, before)


def test_loss_fn_that_never_runs_the_blocks(toy_model):
    with pytest.raises(RuntimeError, match=r"None of the stacks of blocks \['layers'\] ran during `loss_fn"):
        prune(toy_model, toy_batches(1), lambda model, batch: torch.tensor(0.0), PruningConfig())


def test_rank_outside_world(toy_model):
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, world_size=2\), got 2"):
        prune(toy_model, toy_batches(2), toy_loss, PruningConfig(), rank=2, world_size=2)


def test_rank_without_calibration_batches(toy_model):
    with pytest.raises(ValueError, match=r"rank 1 of 2 got no calibration batch \(1 batches in all\)"):
        prune(toy_model, toy_batches(1), toy_loss, PruningConfig(), rank=1, world_size=2)


def test_scores_from_other_settings(toy_model):
    scores = score_groups(toy_model, toy_batches(2), toy_loss, PruningConfig(coarse_samples=8, aggregate="avg"))
    with pytest.raises(
        ValueError, match=r"`scores` were computed with other settings .*aggregate \('avg' in the scores, 'sum' now\)"
    ):
        prune(toy_model, toy_batches(2), toy_loss, PruningConfig(coarse_samples=8), scores=scores)


def test_scoring_with_uniform_importance(toy_model):
    estimators = r"\('zeroth_order', 'first_order', 'gradient_norm'\)"
    with pytest.raises(ValueError, match=rf"`importance` must be an estimator to score groups {estimators}"):
        score_groups(toy_model, toy_batches(1), toy_loss, PruningConfig(importance="uniform"))


def test_engine_import_pulls_in_no_lightning_stack():
    """The engine is pure PyTorch (docs/contributing.md, Habits): importing it loads no Lightning, torchmetrics or
    jsonargparse."""
    code = (
        "import sys, ecoflap_pl.pruning\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'lightning', 'pytorch_lightning', "
        "'lightning_fabric', 'torchmetrics', 'jsonargparse'}))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert completed.stdout.strip() == "[]"


class _WithASecondStack(ToyModel):
    """ToyModel whose blocks are followed by a second stack of two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.more = nn.ModuleList(ToyBlock(16) for _ in range(2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for layer in [*self.layers, *self.more]:
            hidden = layer(hidden)
        return self.head(hidden).mean(dim=1)


@pytest.mark.parametrize(("positions", "said"), [([0, 1, 0], "0 and 2"), ([0, 0, 0], "0 and 1")])
def test_a_block_held_at_several_positions_is_refused(positions, said):
    """A block shared across depths (ALBERT-style) ran more often than the other blocks of its stack, and the engine
    ended in "Blocks [1] of a stack of 2 did not run 2 time(s)"; with one block at every position the stack was not
    found at all. Leaving the stack out prunes the rest."""
    model = _WithASecondStack()
    blocks = [model.layers[index] for index in positions]
    model.layers = nn.ModuleList(blocks)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"The stack `layers` holds the same block object at positions {said} "):
        prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5))
    assert_bit_identical(model, before)
    result = prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, exclude=("layers.*",)))
    assert result.masks.keys() == {f"more.{i}.{fc}.weight" for i in range(2) for fc in ("fc1", "fc2")}
    assert torch.equal(model.layers[0].fc1.weight, before["layers.0.fc1.weight"])  # the shared block left dense


def test_one_linear_weight_inside_two_blocks_is_refused():
    """A Linear shared by two blocks was pruned twice, under two names."""
    model = ToyModel()
    model.layers[1].fc1 = model.layers[0].fc1
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers.0.fc1.weight and layers.1.fc1.weight are one tensor, shared by two"):
        prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5))
    assert_bit_identical(model, before)
    result = prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, exclude=("layers.1.fc1.weight",)))
    assert "layers.0.fc1.weight" in result.masks and "layers.1.fc1.weight" not in result.masks


def _masked_by_torch_prune(model: ToyModel) -> nn.Module:
    linear = model.layers[1].fc1
    torch_prune.l1_unstructured(linear, "weight", amount=0.25)
    return linear


def _parametrized(model: ToyModel) -> nn.Module:
    linear = model.layers[1].fc1
    parametrize.register_parametrization(linear, "weight", _Halved())
    return linear


class _Halved(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


@pytest.mark.parametrize(
    ("compute", "cause", "fix"),
    [
        (_masked_by_torch_prune, r"a torch.nn.utils.prune mask", r"torch.nn.utils.prune.remove\(module, 'weight'\)"),
        (_parametrized, r"a parametrization", r"parametrize.remove_parametrizations\(module, 'weight'\)"),
    ],
)
def test_a_weight_computed_in_the_forward_is_refused_naming_how_to_make_it_plain(compute, cause, fix):
    """A Linear pruned before with ``torch.nn.utils.prune`` or parametrized: the refusal was the model's own
    "AttributeError: `weight` is not an nn.Parameter", naming neither the weight nor the cause. Made plain as the
    hint says, the model is pruned (a torch.nn.utils.prune mask's zeros stay pruned); left out, the rest is."""
    model = seeded_toy_model()
    linear = compute(model)
    before = snapshot(model)
    config = PruningConfig(sparsity=0.5)
    with pytest.raises(ValueError, match=rf"The weight layers\.1\.fc1\.weight is no parameter .* from {cause}.*{fix}"):
        prune(model, toy_batches(2), toy_loss, config)
    assert_bit_identical(model, before)
    result = prune(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, exclude=("layers.1.fc1.weight",)))
    assert "layers.1.fc1.weight" not in result.masks and "layers.0.fc1.weight" in result.masks
    zeros_before = linear.weight == 0
    if parametrize.is_parametrized(linear):
        parametrize.remove_parametrizations(linear, "weight")
    else:
        torch_prune.remove(linear, "weight")
    result = prune(model, toy_batches(2), toy_loss, config)
    assert not result.masks["layers.1.fc1.weight"][zeros_before].any()
    assert torch.equal(~result.masks["layers.1.fc1.weight"], linear.weight == 0)
