"""The expected Spearman ρ of zeroth-order block scores (``benchmarks/_reference.py``), on hand-made gradient norms."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _reference

    return _reference


def _norms(spread: float) -> tuple[list[dict[str, float]], dict[str, list[str]]]:
    """Two batches, 6 blocks of 3 tensors; block ``i``'s tensors have norm ``1 + spread * i``."""
    groups = {f"block{i}": [f"block{i}.w{t}" for t in range(3)] for i in range(6)}
    batch = {name: 1.0 + spread * i for i, names in enumerate(groups.values()) for name in names}
    return [batch, dict(batch)], groups


def test_many_probes_recover_the_exact_ranking(reference) -> None:
    norms, groups = _norms(spread=0.5)
    mean, low = reference.simulated_spearman(norms, groups, probes=2000, batches=2, draws=20)
    assert mean == pytest.approx(1.0)
    assert low == pytest.approx(1.0)


def test_one_probe_ranks_close_norms_loosely_and_more_probes_help(reference) -> None:
    norms, groups = _norms(spread=0.05)
    one, _ = reference.simulated_spearman(norms, groups, probes=1, batches=1, per_block=True, draws=200)
    many, _ = reference.simulated_spearman(norms, groups, probes=64, batches=1, per_block=True, draws=200)
    per_tensor, _ = reference.simulated_spearman(norms, groups, probes=1, batches=1, per_block=False, draws=200)
    assert one < 0.5
    assert many > one + 0.3
    assert per_tensor > one  # three independent directions per block average out more of the noise than one


def test_exact_gradient_norms_match_autograd(reference) -> None:
    import torch

    model = torch.nn.Linear(3, 2)
    batches = [torch.ones(4, 3), torch.arange(12.0).reshape(4, 3)]

    def loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return module(batch).pow(2).sum()

    norms = reference.exact_gradient_norms(model, batches, loss, ["weight"])
    for batch, found in zip(batches, norms, strict=True):
        (gradient,) = torch.autograd.grad(loss(model, batch), [model.weight])
        assert found["weight"] == pytest.approx(float(gradient.norm()))
    assert model.weight.grad is None
