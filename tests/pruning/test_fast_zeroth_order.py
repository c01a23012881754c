"""Prefix reuse and batched probes against the plain per-probe loop (the reference)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ecoflap_pl import PruningConfig, prune, score_groups
from ecoflap_pl.pruning.discovery import find_candidates, find_stacks
from ecoflap_pl.pruning.fast_zeroth_order import choose_replicas, fast_zeroth_order_sums
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.zeroth_order import zeroth_order_sums
from tests.pruning.pruning_helpers import (
    FAMILIES,
    OpaqueWeight,
    ToyModel,
    assert_bit_identical,
    family_case,
    seeded_toy_model,
    snapshot,
    toy_batches,
    toy_loss,
)

FAST_LOGGER = "ecoflap_pl.pruning.fast_zeroth_order"


def as_double(model, batches):
    """fp64: the loss differences carry no rounding noise, so both paths must agree to ~1e-9."""
    return model.double(), [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]


def both_paths(model, units, batches, loss_fn, max_replicas, probes=1):
    batches = list(enumerate(batches))
    with StageMonitor(torch.device("cpu")) as plain_monitor:
        plain = zeroth_order_sums(
            model, units, batches, loss_fn, eps=1e-3, probes=probes, seed=5, monitor=plain_monitor
        )
    with StageMonitor(torch.device("cpu")) as fast_monitor:
        fast = fast_zeroth_order_sums(
            model,
            units,
            batches,
            loss_fn,
            eps=1e-3,
            probes=probes,
            seed=5,
            monitor=fast_monitor,
            max_replicas=max_replicas,
        )
    return plain, fast, fast_monitor.stats


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("max_replicas", [1, 4])
def test_every_family_gives_the_plain_estimates(family, max_replicas, caplog):
    """BLIP-2 OPT/FlanT5 (T5 position bias, encoder->decoder cross-attention), BLIP, CLIP (contrastive loss over
    the batch), ViLT (two runs of the stack per forward), T5, LLaMA, timm ViT and EVA (fused qkv via F.linear)."""
    model, batches = as_double(*family_case(family, batches=2, size=2)[:2])
    loss_fn = FAMILIES[family][1]
    params = dict(model.named_parameters())
    units = {c.name: [params[c.name]] for c in find_candidates(model, find_stacks(model), PruningConfig())}
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger=FAST_LOGGER):
        plain, fast, stats = both_paths(model, units, batches, loss_fn, max_replicas)
    assert not [r for r in caplog.records if r.name == FAST_LOGGER]  # no fallback to the plain loop
    assert stats.probe_replicas == max_replicas and stats.recorded_bytes > 0
    assert fast == pytest.approx(plain, rel=1e-8, abs=1e-10)
    assert_bit_identical(model, before)
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]


def test_blocks_before_the_probed_one_never_run():
    """3 blocks of 2 weights, 1 batch, 1 probe: a weight of block k runs blocks k.. only, for L+ and for L-."""
    model, batches = as_double(seeded_toy_model(), toy_batches(1))
    params = dict(model.named_parameters())
    units = {f"layers.{k}.{fc}.weight": [params[f"layers.{k}.{fc}.weight"]] for k in range(3) for fc in ("fc1", "fc2")}
    _, _, single = both_paths(model, units, batches, toy_loss, max_replicas=1)
    assert single.block_forwards == 2 * 2 * (3 + 2 + 1)
    # record + replay check + one forward per probe
    assert single.full_forwards == 2 + 2 * len(units)
    _, _, batched = both_paths(model, units, batches, toy_loss, max_replicas=4)
    # packs of 2 directions sorted by block: (block 0, block 0), (block 1, block 1), (block 2, block 2); 4 replicas each
    assert batched.block_forwards == 4 * (3 + 2 + 1)
    assert batched.full_forwards == 2 + 3 * (1 + 4)  # one batched block forward + 4 per-replica losses per pack


@pytest.mark.parametrize("probe_granularity", ["per_tensor", "per_block"])
def test_same_scores_and_allocation_in_fp32(probe_granularity):
    batches = toy_batches(4)
    settings = {"sparsity": 0.5, "coarse_samples": 16, "probes": 3, "probe_granularity": probe_granularity}
    plain = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(**settings, activation_storage="recompute"))
    fast = prune(seeded_toy_model(), batches, toy_loss, PruningConfig(**settings))
    # x·(W ± εZ)ᵀ and x·Wᵀ ± ε·x·Zᵀ round differently in fp32; ĝ = ΔL / 2ε amplifies that to ~1e-4
    assert fast.group_scores == pytest.approx(plain.group_scores, rel=1e-3)
    assert fast.group_sparsity == pytest.approx(plain.group_sparsity, abs=1e-4)
    assert fast.stages["coarse"].block_forwards < plain.stages["coarse"].full_forwards * 3


def test_interrupt_mid_probe_leaves_weights_and_blocks_untouched():
    model = seeded_toy_model().to(torch.bfloat16)
    batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()} for b in toy_batches(2)]
    before = snapshot(model)
    calls = []

    def interrupting_loss(model, batch):
        calls.append(1)
        if len(calls) == 6:  # discovery, record, replay check, then inside the probes
            raise KeyboardInterrupt
        return toy_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        prune(model, batches, interrupting_loss, PruningConfig(sparsity=0.5, coarse_samples=8))
    assert_bit_identical(model, before)
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]
    assert len(calls) == 6


class InPlaceAfterBlocks(ToyModel):
    """Modifies each block's output in place after it returns: a record would be corrupted by reuse."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
            hidden.mul_(1.0)
        return self.head(hidden).mean(dim=1)


class SequenceFirst(ToyModel):
    """Runs its blocks on ``[tokens, batch, width]``: replicas stacked on the batch dimension are not outermost."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs).transpose(0, 1)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
        return self.head(hidden.transpose(0, 1)).mean(dim=1)


@pytest.mark.parametrize(
    ("model_class", "message"),
    [
        (InPlaceAfterBlocks, "modified a recorded block output in place"),
        (OpaqueWeight, "never used in an F.linear call"),
        (SequenceFirst, "Batched probes fall back to one probe per forward"),
    ],
)
def test_what_breaks_an_assumption_falls_back_with_a_warning(model_class, message, caplog):
    torch.manual_seed(0)
    model, batches = as_double(model_class().eval(), toy_batches(2))
    params = dict(model.named_parameters())
    units = {n: [p] for n, p in params.items() if n.startswith("layers") and n.endswith("weight") and p.ndim == 2}
    with caplog.at_level(logging.WARNING, logger=FAST_LOGGER):
        plain, fast, _ = both_paths(model, units, batches, toy_loss, max_replicas=4)
    assert message in caplog.text
    assert fast == pytest.approx(plain, rel=1e-8)


def test_the_fallback_loop_still_reports_progress_unit_by_unit():
    """Progress is where the callback honours SIGTERM, so the plain loop the fast path falls back to reports it too."""
    torch.manual_seed(0)
    model = InPlaceAfterBlocks().eval()
    params = dict(model.named_parameters())
    units = {n: [p] for n, p in params.items() if n.startswith("layers") and n.endswith("weight") and p.ndim == 2}
    reported = []
    fast_zeroth_order_sums(
        model,
        units,
        list(enumerate(toy_batches(2))),
        toy_loss,
        eps=1e-3,
        probes=1,
        seed=0,
        monitor=StageMonitor(torch.device("cpu")),
        max_replicas=4,
        on_progress=lambda done, total: reported.append((done, total)),
    )
    assert reported[-len(units) :] == [(i, len(units)) for i in range(1, len(units) + 1)]


def test_replicas_follow_the_memory_left_and_the_cap():
    cpu = torch.device("cpu")
    assert choose_replicas(1, 10, cpu)[0] == 1
    assert choose_replicas(7, 10, cpu)[0] == 6  # even: the ± pair of a direction shares a forward
    assert choose_replicas(8, 2**60, cpu)[0] == 1  # a record larger than the memory left: one probe per forward


def test_scores_on_a_model_with_a_plain_module_list():
    model = seeded_toy_model()
    scores = score_groups(model, toy_batches(2), toy_loss, PruningConfig(sparsity=0.5, coarse_samples=8))
    assert scores.stats.probe_replicas == 8 and all(value > 0 for value in scores.scores.values())


class TwoCallsPerForward(nn.Module):
    """The same stack runs twice per forward, the second run fed by the first: nothing of run 2 is reusable before
    the probed block of run 1 starts."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ToyModel()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.inner.embed(inputs)
        for _ in range(2):
            for layer in self.inner.layers:
                hidden = layer(hidden, scale=0.5)
        return self.inner.head(hidden).mean(dim=1)


def test_a_stack_run_twice_per_forward():
    torch.manual_seed(0)
    model, batches = as_double(TwoCallsPerForward().eval(), toy_batches(2))
    params = dict(model.named_parameters())
    units = {n: [p] for n, p in params.items() if ".layers." in n and n.endswith("weight") and p.ndim == 2}
    plain, fast, _ = both_paths(model, units, batches, toy_loss, max_replicas=4, probes=2)
    assert fast == pytest.approx(plain, rel=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation_storage": "disk"}, "`activation_storage` must be one of"),
        ({"max_probe_replicas": 0}, "`max_probe_replicas` must be a positive integer"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_progress_counts_forwards_of_probes_up_to_its_total():
    events = []
    prune(
        seeded_toy_model(),
        toy_batches(4),
        toy_loss,
        PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8, max_probe_replicas=4),
        progress=lambda stage, done, total: events.append((done, total)) if stage == "coarse" else None,
    )
    # 6 tensors x 2 batches, 2 directions (4 replicas) per forward: 3 forwards per batch
    assert events == [(i, 6) for i in range(1, 7)]
