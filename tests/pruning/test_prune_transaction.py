"""prune() is all-or-nothing: whatever goes wrong, every weight, flag and cache setting is as it was before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecoflap_pl import PruningConfig, prune, score_groups
from tests.pruning.pruning_helpers import ToyBlock, assert_bit_identical, family_case, snapshot, toy_batches


class OpaqueBlock(ToyBlock):
    """A ToyBlock that can multiply by ``fc1.weight`` itself, outside any ``F.linear`` call (nothing to measure)."""

    def __init__(self, width: int, opaque: bool) -> None:
        super().__init__(width)
        self.opaque = opaque

    def forward(self, hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if not self.opaque:
            return super().forward(hidden, scale)
        inner = self.norm(hidden) @ self.fc1.weight.T + self.fc1.bias
        return hidden + scale * self.fc2(torch.relu(inner))


class TwoTowers(nn.Module):
    """Two stacks run one after the other, so a failure in the second comes after the first was pruned."""

    def __init__(self, second_width: int = 16, opaque_second: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.first = nn.ModuleList(OpaqueBlock(12, opaque=False) for _ in range(2))
        self.bridge = nn.Linear(12, second_width)
        self.second = nn.ModuleList(OpaqueBlock(second_width, opaque=opaque_second) for _ in range(2))
        self.head = nn.Linear(second_width, 5)

    def forward(self, inputs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        hidden = self.embed(inputs)
        for block in self.first:
            hidden = block(hidden)
        hidden = self.bridge(hidden) * scale
        for block in self.second:
            hidden = block(hidden)
        return self.head(hidden).mean(dim=1)


def two_tower_loss(model, batch):
    loss = nn.functional.cross_entropy(model(batch["inputs"], batch.get("scale", 1.0)), batch["labels"])
    return loss * batch.get("loss_scale", 1.0)


def two_towers(**kwargs):
    torch.manual_seed(0)
    model = TwoTowers(**kwargs)
    model.train()  # prune() switches to eval mode and must give the training flags back
    return model


def first_tower_pruned(model):
    return any(bool((block.fc1.weight == 0).any()) for block in model.first)


def check_unchanged(model, before):
    assert_bit_identical(model, before)
    assert all(module.training for module in model.modules())


def test_bad_scores_leave_the_model_unchanged():
    model = two_towers()
    before = snapshot(model)
    scores = score_groups(model, toy_batches(2), two_tower_loss, PruningConfig(coarse_samples=8, granularity="layer"))
    with pytest.raises(ValueError, match="`scores` were computed with other settings"):
        prune(model, toy_batches(2), two_tower_loss, PruningConfig(coarse_samples=8), scores=scores)
    check_unchanged(model, before)


def test_bad_structure_for_a_later_tower_is_refused_before_any_work():
    """It was found by the fine step of the second tower, after pruning the first (then rolled back), and named only
    the shape; now every misfit is named before the first forward."""
    model = two_towers(second_width=10)  # 1:3 fits the first tower's widths (12, 24), not the second's (10)
    before = snapshot(model)
    config = PruningConfig(sparsity=2 / 3, structure="1:3", importance="uniform", fine_samples=8)
    calls = []

    def counted_loss(model, batch):
        calls.append(batch)
        return two_tower_loss(model, batch)

    with pytest.raises(
        ValueError, match=r"not a multiple of M=3: second\.0\.fc1\.weight \[20, 10\], .*HINT: .*exclude"
    ):
        prune(model, toy_batches(2), counted_loss, config)
    assert calls == []
    check_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("importance", ["zeroth_order", "first_order", "gradient_norm"])
def test_non_finite_loss_names_the_batch(bad, importance):
    model = two_towers()
    before = snapshot(model)
    batches = toy_batches(3)
    batches[2]["loss_scale"] = bad
    with pytest.raises(FloatingPointError, match=f"calibration loss is {bad} on calibration batch 2"):
        prune(model, batches, two_tower_loss, PruningConfig(importance=importance, coarse_samples=12))
    check_unchanged(model, before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_non_finite_inputs_in_the_fine_step_name_the_batch():
    """With uniform sparsity no loss is evaluated after discovery; the fine step checks what its layers see."""
    model = two_towers()
    before = snapshot(model)
    batches = toy_batches(3)
    batches[1]["scale"] = float("nan")  # only the second tower's inputs are NaN: the first is already pruned
    config = PruningConfig(importance="uniform", fine_samples=12)
    with pytest.raises(FloatingPointError, match=r"\['second.0.fc1.weight'.*not finite on calibration batch 1"):
        prune(model, batches, two_tower_loss, config)
    check_unchanged(model, before)


def test_a_weight_used_outside_f_linear_cannot_be_measured():
    model = two_towers(opaque_second=True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"never used in an F.linear call.*\['second.0.fc1.weight'\]"):
        prune(model, toy_batches(2), two_tower_loss, PruningConfig(importance="uniform", fine_samples=8))
    check_unchanged(model, before)
    # Excluding it, as the hint says, works; magnitude pruning needs no inputs at all.
    prune(model, toy_batches(2), two_tower_loss, PruningConfig(importance="uniform", exclude=("second.*.fc1.*",)))
    prune(two_towers(opaque_second=True), toy_batches(2), two_tower_loss, PruningConfig(method="magnitude"))


def test_keyboard_interrupt_mid_fine_step_restores_everything():
    model = two_towers()
    before = snapshot(model)
    interrupted = []

    def interrupting_loss(model, batch):
        if first_tower_pruned(model):
            interrupted.append(True)
            raise KeyboardInterrupt
        return two_tower_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        prune(model, toy_batches(2), interrupting_loss, PruningConfig(coarse_samples=8, fine_samples=8))
    assert interrupted
    check_unchanged(model, before)


def test_keyboard_interrupt_during_first_order_scoring_restores_gradients_and_flags():
    model = two_towers()
    model.embed.weight.requires_grad_(False)
    leftover = torch.ones_like(model.head.weight)
    model.head.weight.grad = leftover
    before = snapshot(model)
    calls = []

    def interrupting_loss(model, batch):
        calls.append(1)
        if len(calls) == 3:  # discovery, first batch's backward, then stop
            raise KeyboardInterrupt
        return two_tower_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        prune(model, toy_batches(3), interrupting_loss, PruningConfig(importance="first_order", coarse_samples=12))
    check_unchanged(model, before)
    assert model.head.weight.grad is leftover
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["embed.weight"]
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")


def test_interrupted_hugging_face_model_gets_its_cache_setting_back():
    model, batches, loss_fn = family_case("t5")
    model.train()
    before = snapshot(model)

    def interrupting_loss(model, batch):
        assert model.config.use_cache is False and not model.training  # pruning runs without KV cache, in eval
        if bool((model.encoder.block[0].layer[0].SelfAttention.q.weight == 0).any()):
            raise KeyboardInterrupt  # the encoder is pruned: this is the decoder's fine-step forward
        return loss_fn(model, batch)

    with pytest.raises(KeyboardInterrupt):
        prune(model, batches, interrupting_loss, PruningConfig(importance="uniform", fine_samples=4))
    check_unchanged(model, before)
    assert model.config.use_cache is True
