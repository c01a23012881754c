"""TopKAccuracy against a plain loop and torchmetrics' MulticlassAccuracy; repeated ids counted once; errors."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from ecoflap_pl.metrics import TopKAccuracy, top_k_accuracy


def _reference(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> float:
    """The share of samples whose label scores above all but fewer than ``top_k`` other classes, by a loop."""
    hits = 0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        higher = sum(score > row[label] for score in row)
        hits += higher < top_k
    return hits / len(labels)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_equals_a_loop_and_torchmetrics_over_batches(top_k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(37, 8, generator=gen), torch.randint(0, 8, (37,), generator=gen)
    metric = TopKAccuracy(top_k=top_k)
    reference = MulticlassAccuracy(num_classes=8, top_k=top_k, average="micro")
    for start in range(0, 37, 10):
        part = slice(start, start + 10)
        metric.update(logits[part], labels[part], ids=list(range(37))[part])
        reference.update(logits[part], labels[part])
    result = metric.compute()
    assert result.ndim == 0 and float(result) == pytest.approx(_reference(logits, labels, top_k), abs=1e-7)
    assert float(result) == pytest.approx(float(reference.compute()), abs=1e-7)
    assert float(top_k_accuracy(logits, labels, top_k=top_k)) == pytest.approx(float(result), abs=1e-7)


def test_a_repeated_id_is_counted_once_and_without_ids_every_sample_counts() -> None:
    # labels 0, 1, 2: the first two are hits; a padding DistributedSampler repeats the first
    logits, labels = torch.eye(3)[[0, 1, 1, 0]], torch.tensor([0, 1, 2, 0])
    metric = TopKAccuracy()
    metric.update(logits[:2], labels[:2], ids=["dev-0-0-0", "dev-1-0-0"])
    metric.update(logits[2:], labels[2:], ids=["dev-2-0-0", "dev-0-0-0"])
    assert float(metric.compute()) == pytest.approx(2 / 3)
    assert float(top_k_accuracy(logits, labels, ids=["a", "b", "c", "a"])) == pytest.approx(2 / 3)
    # without ids (or with a None id) the repeat counts again: torchmetrics' sum, 3 / 4
    assert float(top_k_accuracy(logits, labels)) == pytest.approx(3 / 4)
    assert float(top_k_accuracy(logits, labels, ids=["a", "b", "c", None])) == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    ("logits", "labels", "top_k", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 1, r"`logits` must be \[num_samples, num_classes\]"),
        (torch.zeros(2), torch.zeros(2, dtype=torch.long), 1, r"`logits` must be \[num_samples, num_classes\]"),
        (
            torch.zeros(2, 3),
            torch.zeros(2, dtype=torch.long),
            5,
            r"`top_k` must be at most the number of classes \(3\)",
        ),
    ],
)
def test_update_rejects_bad_input(logits: torch.Tensor, labels: torch.Tensor, top_k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TopKAccuracy(top_k=top_k).update(logits, labels)


def test_ids_must_name_each_sample() -> None:
    with pytest.raises(ValueError, match=r"`ids` must have one id per sample \(2\), got 1"):
        TopKAccuracy().update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ids=[7])


@pytest.mark.parametrize("top_k", [0, 1.0, True])
def test_top_k_must_be_a_positive_int(top_k: object) -> None:
    with pytest.raises(ValueError, match="`top_k` must be a positive int"):
        TopKAccuracy(top_k=top_k)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_compute_without_samples_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        TopKAccuracy().compute()
