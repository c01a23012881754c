"""Top-K accuracy (ImageNet top-1 / top-5, NLVR2) over a whole split, each sample id once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from ecoflap_pl.metrics._states import ListStateMetric, cat_state, first_occurrences, sample_ids, text_state_dtypes


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive int, got {top_k!r}. HINT: 1 for top-1, 5 for top-5.")
    return top_k


def _top_k_hits(logits: Tensor, labels: Tensor, top_k: int) -> Tensor:
    """``int64 [N]``: 1 where the label is among the ``top_k`` highest logits of its sample, else 0."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            "`logits` must be [num_samples, num_classes] and `labels` [num_samples], got shapes "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    num_classes = logits.shape[1]
    if top_k > num_classes:
        raise ValueError(
            f"`top_k` must be at most the number of classes ({num_classes}), got {top_k}. "
            "HINT: cap it, top_k=min(k, num_classes)."
        )
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=logits.device)
    # torchmetrics' MulticlassAccuracy keeps only sums, which cannot drop a sample that a padding DistributedSampler
    # repeats; its samplewise form of [N, C, 1] logits gives each sample's own top-K hit (0 or 1) to keep instead.
    hits = multiclass_accuracy(
        logits.detach().unsqueeze(-1),
        labels.unsqueeze(-1),
        num_classes=num_classes,
        top_k=top_k,
        average="micro",
        multidim_average="samplewise",
    )
    return hits.round().to(torch.int64)


def _accuracy_compute(hits: Tensor, keys: Sequence[str]) -> Tensor:
    """The share of hits among the samples, a repeated key counted once (``""``: no key, always counted)."""
    if hits.numel() == 0:
        raise ValueError("Top-K accuracy needs at least one sample, got none. HINT: call update() first.")
    keep = torch.tensor(first_occurrences(keys), dtype=torch.bool, device=hits.device)
    kept = hits[keep]
    return kept.sum() / kept.numel()


def top_k_accuracy(
    logits: Tensor, labels: Tensor, top_k: int = 1, ids: Sequence[int | str | None] | None = None
) -> Tensor:
    """Functional form of :class:`TopKAccuracy` (same arguments as its constructor and ``update``).

    Returns:
        The share of samples whose label is among their ``top_k`` highest logits, each id once (0-dim float).
    """
    top_k = _check_top_k(top_k)
    hits = _top_k_hits(logits, torch.as_tensor(labels, device=logits.device), top_k)
    return _accuracy_compute(hits, sample_ids(ids, len(hits)))


class TopKAccuracy(ListStateMetric):
    """The share of samples whose label is among their ``top_k`` highest logits (micro: every sample counts once).

    Each sample's hit (0 or 1, through torchmetrics' ``multiclass_accuracy``) and id go into ``cat`` states, so under
    DDP :meth:`compute` sees the whole split and drops the samples a padding ``DistributedSampler`` repeats (a
    repeated id is counted once): the number equals a one-device run whatever the world size. Without ``ids`` every
    sample counts, repeats included (torchmetrics' ``MulticlassAccuracy(average="micro")``, which keeps only sums).
    States are integers, so a bf16 cast of the LightningModule leaves them exact.

    Example::

        metric = TopKAccuracy(top_k=5)
        metric.update(logits, labels, ids=["n01440764/ILSVRC2012_val_00000293.JPEG", ...])
        metric.compute()  # tensor(0.75)

    Args:
        top_k: a hit is a label among the ``top_k`` highest logits (1: top-1 accuracy).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {"hits": torch.int64, **text_state_dtypes("id")}

    hits: list[Tensor]
    id_bytes: list[Tensor]
    id_lengths: list[Tensor]

    def __init__(self, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = _check_top_k(top_k)

    def update(self, logits: Tensor, labels: Tensor, ids: Sequence[int | str | None] | None = None) -> None:
        """Add a batch.

        Args:
            logits: ``[num_samples, num_classes]`` scores (logits or probabilities).
            labels: ``[num_samples]`` class index of each sample.
            ids: an id per sample (ImageNet's ``image_id``, NLVR2's ``identifier``); a repeated id is counted once.
                None (or a None id): no de-duplication of those samples.
        """
        hits = _top_k_hits(logits, torch.as_tensor(labels, device=logits.device), self.top_k)
        keys = sample_ids(ids, len(hits))
        self.hits.append(hits)
        self._append_texts("id", keys)

    def compute(self) -> Tensor:
        """Top-K accuracy over every sample seen by every rank, each id once.

        Returns:
            A 0-dim float tensor, a fraction in [0, 1].
        """
        return _accuracy_compute(cat_state(self.hits, torch.int64), self._texts("id"))
