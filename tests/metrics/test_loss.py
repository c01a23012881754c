"""MeanLoss against a plain loop; repeated ids counted once; exact through a bf16 cast of the module; errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ecoflap_pl.metrics import MeanLoss, mean_loss


def test_equals_a_loop_over_the_samples_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(37, 8, generator=gen), torch.randint(0, 8, (37,), generator=gen)
    losses = F.cross_entropy(logits, labels, reduction="none")
    metric = MeanLoss()
    for start in range(0, 37, 10):  # batches of unequal size: 10, 10, 10, 7
        part = slice(start, start + 10)
        metric.update(losses[part], ids=list(range(37))[part])
    result = metric.compute()
    assert result.dtype == torch.float64 and result.ndim == 0
    assert float(result) == pytest.approx(math.fsum(losses.tolist()) / 37, rel=1e-15)
    assert float(mean_loss(losses)) == pytest.approx(float(result), rel=1e-15)


def test_a_repeated_id_is_counted_once_and_without_ids_every_sample_counts() -> None:
    # a padding DistributedSampler repeats the first sample at the end
    losses = torch.tensor([4.0, 1.0, 1.0, 4.0])
    metric = MeanLoss()
    metric.update(losses[:2], ids=["dev-0-0-0", "dev-1-0-0"])
    metric.update(losses[2:], ids=["dev-2-0-0", "dev-0-0-0"])
    assert float(metric.compute()) == 2.0  # (4 + 1 + 1) / 3, not (4 + 1 + 1 + 4) / 4
    assert float(mean_loss(losses, ids=[7, 8, 9, 7])) == 2.0
    assert float(mean_loss(losses)) == 2.5
    assert float(mean_loss(losses, ids=["a", "b", "c", None])) == 2.5


def test_losses_stay_exact_through_a_bfloat16_cast_of_the_lightning_module() -> None:
    # "bf16-true" precision calls module.to(torch.bfloat16), which converts every floating-point metric state; 1/3 and
    # 1 + 2^-20 have no bf16 (nor exact fp32) form, so a float state would show it
    metric = MeanLoss()
    nn.ModuleDict({"loss": metric}).to(torch.bfloat16)
    metric.update(torch.tensor([1 / 3, 1 + 2**-20], dtype=torch.float64), ids=["a", "b"])
    metric.update(torch.tensor([1 / 3], dtype=torch.float64), ids=["a"])
    nn.ModuleDict({"loss": metric}).to(torch.bfloat16)
    assert metric.loss_bits[0].dtype == torch.int64
    assert float(metric.compute()) == (1 / 3 + 1 + 2**-20) / 2


@pytest.mark.parametrize("losses", [torch.zeros(2, 3), torch.tensor(1.0), torch.tensor([1, 2])])
def test_update_refuses_anything_but_a_loss_per_sample(losses: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"`losses` must be a 1-D float tensor of per-sample losses"):
        MeanLoss().update(losses)


def test_ids_must_name_each_sample() -> None:
    with pytest.raises(ValueError, match=r"`ids` must have one id per sample \(2\), got 1"):
        MeanLoss().update(torch.zeros(2), ids=[7])


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_compute_without_samples_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        MeanLoss().compute()
    metric = MeanLoss()
    metric.update(torch.zeros(0), ids=[])
    with pytest.raises(ValueError, match="at least one sample"):
        metric.compute()
    with pytest.raises(ValueError, match="at least one sample"):
        mean_loss(torch.zeros(0))
