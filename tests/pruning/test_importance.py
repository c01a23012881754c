"""Zeroth- and first-order importance against autograd on a small model."""

import contextlib
import copy
import math
from dataclasses import replace

import pytest
import torch

from ecoflap_pl import PruningConfig, score_groups
from ecoflap_pl.pruning.first_order import first_order_sums
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.zeroth_order import probe_seed, zeroth_order_sums
from tests.pruning.pruning_helpers import ToyModel, assert_bit_identical, snapshot, toy_batches, toy_loss


def autograd_gradients(model, batch):
    model.zero_grad()
    toy_loss(model, batch).backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return gradients


def double_batches(count, size):
    return [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in toy_batches(count, size)]


def test_zeroth_order_magnitude_approaches_sqrt_2_over_pi_times_gradient_norm():
    """E|zᵀ∇L| = sqrt(2/π)·‖∇L‖ for z ~ N(0, I): per tensor, and per block (one direction for the block's tensors)."""
    torch.manual_seed(0)
    model = ToyModel(width=8, depth=2).double().eval()
    batch = double_batches(1, size=8)[0]
    params = dict(model.named_parameters())
    block = ["layers.1.fc1.weight", "layers.1.fc2.weight"]
    units = {"layers.0.fc1.weight": [params["layers.0.fc1.weight"]], "layers.1": [params[n] for n in block]}
    probes = 800
    with StageMonitor(torch.device("cpu")) as monitor:
        sums = zeroth_order_sums(model, units, [(0, batch)], toy_loss, eps=1e-4, probes=probes, seed=0, monitor=monitor)
    assert monitor.full_forwards == 2 * probes * len(units)
    gradients = autograd_gradients(model, batch)
    norms = {
        "layers.0.fc1.weight": float(gradients["layers.0.fc1.weight"].norm()),
        "layers.1": math.sqrt(sum(float(gradients[n].norm()) ** 2 for n in block)),
    }
    for unit, norm in norms.items():
        # mean |N(0, ‖g‖²)| over 800 probes: relative standard error sqrt(π/2 - 1) / sqrt(800) ≈ 2.7%
        assert sums[unit] == pytest.approx(math.sqrt(2 / math.pi) * norm, rel=0.1), unit


def test_zeroth_order_restores_weights_bit_exactly_in_low_precision():
    torch.manual_seed(0)
    model = ToyModel().to(torch.bfloat16).eval()
    batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()} for b in toy_batches(2)]
    before = snapshot(model)
    params = dict(model.named_parameters())
    with StageMonitor(torch.device("cpu")) as monitor:
        zeroth_order_sums(
            model,
            {n: [p] for n, p in params.items() if n.endswith("weight")},
            list(enumerate(batches)),
            toy_loss,
            eps=1e-3,
            probes=2,
            seed=0,
            monitor=monitor,
        )
    assert_bit_identical(model, before)


@pytest.mark.parametrize("score", ["grad_only", "grad_mag_abs", "grad_mag_square"])
def test_first_order_streamed_sums_equal_full_gradients(score):
    torch.manual_seed(0)
    model = ToyModel().double().eval()
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in toy_batches(3)]
    params = {n: p for n, p in model.named_parameters() if n.startswith("layers") and n.endswith("weight")}
    expected = dict.fromkeys(params, 0.0)
    for batch in batches:
        gradients = autograd_gradients(model, batch)
        for name, param in params.items():
            g, w = gradients[name], param.detach()
            expected[name] += float(
                {"grad_only": g.abs(), "grad_mag_abs": w.abs() * g.abs(), "grad_mag_square": w.square() * g.square()}[
                    score
                ].sum()
            )
    model.embed.weight.requires_grad_(False)
    with StageMonitor(torch.device("cpu")) as monitor:
        sums = first_order_sums(model, params, list(enumerate(batches)), toy_loss, score=score, monitor=monitor)
    for name in params:
        assert sums[name] == pytest.approx(expected[name], rel=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert not model.embed.weight.requires_grad and model.head.weight.requires_grad
    assert monitor.backward_passes == 3


def test_scores_are_reusable_and_deterministic(toy_model):
    batches = toy_batches(4)
    config = PruningConfig(sparsity=0.5, coarse_samples=8, activation_storage="recompute")
    before = snapshot(toy_model)
    first = score_groups(toy_model, batches, toy_loss, config)
    second = score_groups(toy_model, batches, toy_loss, config)
    assert_bit_identical(toy_model, before)
    assert first.scores == second.scores
    assert set(first.scores) == {"layers.0", "layers.1", "layers.2"}
    assert first.stats.full_forwards == 2 * 6 * 2  # 2 per probe x 6 tensors x 2 batches (8 samples)
    assert first.allocate(0.5, 0.6) != first.allocate(0.3, 0.4)
    other_seed = score_groups(toy_model, batches, toy_loss, replace(config, seed=1))
    assert other_seed.scores != first.scores


@pytest.mark.parametrize(("aggregate", "probe_granularity"), [("sum", "per_block"), ("avg", "per_tensor")])
def test_group_score_variants(toy_model, aggregate, probe_granularity):
    batches = toy_batches(2)
    scores = score_groups(
        toy_model,
        batches,
        toy_loss,
        PruningConfig(
            sparsity=0.5,
            aggregate=aggregate,
            probe_granularity=probe_granularity,
            coarse_samples=8,
            activation_storage="recompute",
        ),
    )
    assert all(value > 0 for value in scores.scores.values())
    per_unit = 3 if probe_granularity == "per_block" else 6
    assert scores.stats.full_forwards == 2 * per_unit * 2


def slow_zeroth_order_group_scores(model, batches, config, groups):
    """Loop-by-loop ECoFLaP zeroth-order scores on a copy of the model (docs/algorithm.md §2)."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    units = groups if config.probe_granularity == "per_block" else {n: (n,) for names in groups.values() for n in names}
    raw = {}
    for unit_index, (unit, names) in enumerate(units.items()):
        raw[unit] = 0.0
        for batch_id, batch in enumerate(batches):
            generator = torch.Generator().manual_seed(probe_seed(config.seed, unit_index, batch_id, 0))
            directions = [torch.randn(params[n].shape, generator=generator, dtype=params[n].dtype) for n in names]
            originals = [params[n].detach().clone() for n in names]
            losses = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, original, direction in zip(names, originals, directions, strict=True):
                        params[n].copy_(original + sign * config.eps * direction)
                    losses.append(float(toy_loss(model, batch)))
            with torch.no_grad():
                for n, original in zip(names, originals, strict=True):
                    params[n].copy_(original)
            raw[unit] += abs(losses[0] - losses[1]) / (2 * config.eps) / len(batches)  # mean over batches

    def variant(s, names):
        weights = [params[n].detach().double() for n in names]
        if config.score == "grad_only":
            return s
        if config.score == "grad_mag_abs":
            return s * sum(float(w.abs().sum()) for w in weights)
        return s * s * sum(float(w.square().sum()) for w in weights)

    scores = {}
    for group, names in groups.items():
        if config.probe_granularity == "per_block":
            total = variant(raw[group], names)
        else:
            total = sum(variant(raw[n], (n,)) for n in names)
        size = sum(params[n].numel() for n in names)
        scores[group] = total / size if config.aggregate == "avg" else total
    return scores


@pytest.mark.parametrize(
    ("probe_granularity", "score", "aggregate"),
    [
        ("per_tensor", "grad_only", "sum"),
        ("per_tensor", "grad_mag_abs", "avg"),
        ("per_block", "grad_mag_square", "sum"),
    ],
)
def test_zeroth_order_group_scores_match_slow_loop(probe_granularity, score, aggregate):
    torch.manual_seed(0)
    model = ToyModel().double().eval()  # fp64: the loss differences carry no rounding noise
    batches = double_batches(2, size=4)
    config = PruningConfig(
        sparsity=0.5, probe_granularity=probe_granularity, score=score, aggregate=aggregate, coarse_samples=8, seed=3
    )
    scores = score_groups(model, batches, toy_loss, config)
    expected = slow_zeroth_order_group_scores(model, batches, config, scores.groups)
    assert scores.scores == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("score", "aggregate"),
    [("grad_only", "sum"), ("grad_mag_abs", "sum"), ("grad_mag_abs", "avg"), ("grad_mag_square", "sum")],
)
def test_first_order_group_scores_match_slow_reference(score, aggregate):
    """Group score = Σ over the group's tensors of Σ_i r(w_i, mean over batches), with r = |g|, |w|·|g| or w²·g²."""
    torch.manual_seed(0)
    model = ToyModel().double().eval()
    batches = double_batches(3, size=4)
    names = {f"layers.{i}": (f"layers.{i}.fc1.weight", f"layers.{i}.fc2.weight") for i in range(3)}
    gradients = [autograd_gradients(model, batch) for batch in batches]
    params = dict(model.named_parameters())
    expected = {}
    for group, tensors in names.items():
        total = 0.0
        for name in tensors:
            w = params[name].detach()
            if score == "grad_mag_square":
                mean_g = sum(g[name].square() for g in gradients) / len(batches)
                total += float((w.square() * mean_g).sum())
            else:
                mean_g = sum(g[name].abs() for g in gradients) / len(batches)
                total += float(((w.abs() if score == "grad_mag_abs" else 1.0) * mean_g).sum())
        expected[group] = total / sum(params[n].numel() for n in tensors) if aggregate == "avg" else total

    model.embed.weight.requires_grad_(False)
    leftover = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = leftover
    before = snapshot(model)
    config = PruningConfig(sparsity=0.5, importance="first_order", score=score, aggregate=aggregate, coarse_samples=12)
    scores = score_groups(model, batches, toy_loss, config)

    assert scores.scores == pytest.approx(expected, rel=1e-9)
    assert scores.stats.backward_passes == 3 and scores.stats.full_forwards == 3
    assert_bit_identical(model, before)
    assert model.head.weight.grad is leftover
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["embed.weight"]


@pytest.mark.parametrize(
    ("probe_granularity", "score", "aggregate"),
    [
        ("per_tensor", "grad_only", "sum"),
        ("per_tensor", "grad_mag_abs", "avg"),
        ("per_block", "grad_only", "sum"),
        ("per_block", "grad_mag_square", "sum"),
    ],
)
def test_gradient_norm_group_scores_match_autograd_norms(probe_granularity, score, aggregate):
    """s_u = sqrt(2/π) · mean_b ‖∇_u L_b‖₂ (a block's gradient concatenated for ``per_block``), through the variant
    of zeroth order (s, s·Σ|w|, s²·Σw²) and the aggregate."""
    torch.manual_seed(0)
    model = ToyModel().double().eval()
    batches = double_batches(3, size=4)
    groups = {f"layers.{i}": (f"layers.{i}.fc1.weight", f"layers.{i}.fc2.weight") for i in range(3)}
    units = groups if probe_granularity == "per_block" else {n: (n,) for names in groups.values() for n in names}
    gradients = [autograd_gradients(model, batch) for batch in batches]
    params = dict(model.named_parameters())

    def variant(names):
        s = (
            math.sqrt(2 / math.pi)
            * sum(math.sqrt(sum(float(g[n].square().sum()) for n in names)) for g in gradients)
            / len(batches)
        )
        weights = [params[n].detach() for n in names]
        return {
            "grad_only": s,
            "grad_mag_abs": s * sum(float(w.abs().sum()) for w in weights),
            "grad_mag_square": s * s * sum(float(w.square().sum()) for w in weights),
        }[score]

    expected = {}
    for group, names in groups.items():
        total = sum(variant(units[u]) for u in units if u == group or u in names)
        expected[group] = total / sum(params[n].numel() for n in names) if aggregate == "avg" else total

    model.embed.weight.requires_grad_(False)
    leftover = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = leftover
    before = snapshot(model)
    config = PruningConfig(
        sparsity=0.5,
        importance="gradient_norm",
        probe_granularity=probe_granularity,
        score=score,
        aggregate=aggregate,
        coarse_samples=12,
    )
    scores = score_groups(model, batches, toy_loss, config)

    assert scores.scores == pytest.approx(expected, rel=1e-6)  # the variants sum the weights in fp32
    assert scores.stats.backward_passes == 3 and scores.stats.full_forwards == 3
    assert_bit_identical(model, before)
    assert model.head.weight.grad is leftover
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["embed.weight"]


@pytest.mark.parametrize("probe_granularity", ["per_tensor", "per_block"])
def test_zeroth_order_scores_average_to_the_gradient_norm_scores(probe_granularity):
    """``gradient_norm`` is what ``zeroth_order`` estimates: with many probes the estimates approach it."""
    torch.manual_seed(0)
    model = ToyModel().double().eval()
    batches = double_batches(2, size=4)
    config = PruningConfig(sparsity=0.5, probe_granularity=probe_granularity, coarse_samples=8, eps=1e-4)
    exact = score_groups(model, batches, toy_loss, replace(config, importance="gradient_norm"))
    estimated = score_groups(model, batches, toy_loss, replace(config, probes=400))
    # per group: the mean of 800 (or 1,600) |N(0, 1)| draws, relative standard error at most 2.7%
    assert estimated.scores == pytest.approx(exact.scores, rel=0.1)
    assert estimated.scores != pytest.approx(exact.scores, rel=1e-3)  # estimates, not the same computation


def test_gradient_norm_of_a_bf16_model_is_that_of_its_fp32_copy_within_bf16_rounding():
    """A bf16 model scores like its fp32 copy within bf16 rounding, and is left bf16, its weights untouched."""
    torch.manual_seed(0)
    model = ToyModel().eval()
    batches = toy_batches(2)
    config = PruningConfig(sparsity=0.5, importance="gradient_norm", coarse_samples=8)
    reference = score_groups(model, batches, toy_loss, config)
    low = copy.deepcopy(model).to(torch.bfloat16)
    before = snapshot(low)
    low_batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    scores = score_groups(low, low_batches, toy_loss, config)
    assert scores.scores == pytest.approx(reference.scores, rel=0.05)
    assert_bit_identical(low, before)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in low.parameters())


def test_probes_below_the_loss_precision_are_reported(toy_model, caplog):
    """ε so small that fp32 losses cannot tell θ+εz from θ−εz: scores are 0 and a warning says why."""
    config = PruningConfig(coarse_samples=8, eps=1e-12)
    with caplog.at_level("WARNING", logger="ecoflap_pl.pruning.zeroth_order"):
        scores = score_groups(toy_model, toy_batches(2), toy_loss, config)
    assert set(scores.scores.values()) == {0.0}
    assert "Zeroth-order probes of 6 of 6 units saw no change of the loss" in caplog.text
    assert "HINT: raise `eps` (now 1e-12)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ecoflap_pl.pruning.zeroth_order"):
        score_groups(toy_model, toy_batches(2), toy_loss, PruningConfig(coarse_samples=8))
    assert caplog.text == ""


class _CountingResidency:
    """A residency for a model in memory that calls every weight offloaded: records what it was asked to hold
    resident, and holds it as it is."""

    def __init__(self):
        self.held = []

    def resident(self, names, write_back):
        self.held.append((tuple(names), write_back))
        return contextlib.nullcontext()

    def offloaded(self, name):
        return True


@pytest.mark.parametrize("activation_storage", ["recompute", "auto"])
@pytest.mark.parametrize("probe_granularity", ["per_tensor", "per_block"])
def test_a_residency_holds_the_probed_units_resident(toy_model, probe_granularity, activation_storage):
    """Both zeroth-order paths probe offloaded weights by name, holding only the probed units' weights (one block's)
    resident, read-only, and give the scores of the model held in memory."""
    batches = toy_batches(4)
    config = PruningConfig(
        sparsity=0.5, coarse_samples=8, probe_granularity=probe_granularity, activation_storage=activation_storage
    )
    in_memory = score_groups(toy_model, batches, toy_loss, config)
    residency = _CountingResidency()
    held = score_groups(toy_model, batches, toy_loss, config, residency=residency)
    assert held.scores == pytest.approx(in_memory.scores, rel=1e-6)
    assert residency.held and all(not write_back for _, write_back in residency.held)
    assert all(len({name.split(".")[1] for name in names}) == 1 for names, _ in residency.held)  # one block each
    probed = {name for names, _ in residency.held for name in names}
    assert probed == {name for group in held.groups.values() for name in group}
