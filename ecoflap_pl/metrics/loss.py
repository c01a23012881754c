"""The mean of per-sample losses over a whole split, each sample id once (the logged ``val/loss``, ``test/loss``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ecoflap_pl.metrics._states import ListStateMetric, cat_state, first_occurrences, sample_ids, text_state_dtypes


def float64_bits(losses: Tensor) -> Tensor:
    """``int64 [N]``: the bits of each sample's loss as float64.

    Lightning's bf16 precision casts the LightningModule, which converts every floating-point metric state; integer
    states are left alone, so the float64 values travel (and are gathered) as int64 of the same bytes, exactly.
    """
    if losses.ndim != 1 or not losses.is_floating_point():
        raise ValueError(
            f"`losses` must be a 1-D float tensor of per-sample losses [num_samples], got shape {tuple(losses.shape)} "
            f"of {losses.dtype}. HINT: compute the loss with reduction='none', e.g. "
            "F.cross_entropy(logits, labels, reduction='none')."
        )
    return losses.detach().to(torch.float64).contiguous().view(torch.int64)


def kept_losses(bits: Tensor, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The float64 losses held in ``bits`` (on the CPU) and the mask that keeps each key's first sample (``""``: no
    key, always kept)."""
    if bits.numel() == 0:
        raise ValueError("The mean loss needs at least one sample, got none. HINT: call update() first.")
    # on the CPU: float64 is missing on some accelerators (MPS), and these are one number per sample
    return bits.cpu().view(torch.float64), torch.tensor(first_occurrences(keys), dtype=torch.bool)


def _mean_loss_compute(bits: Tensor, keys: Sequence[str]) -> Tensor:
    """The mean of the float64 losses held in ``bits``, a repeated key counted once."""
    losses, keep = kept_losses(bits, keys)
    return losses[keep].mean()


def mean_loss(losses: Tensor, ids: Sequence[int | str | None] | None = None) -> Tensor:
    """Functional form of :class:`MeanLoss` (same arguments as its ``update``).

    Returns:
        The mean of ``losses`` in float64, each id once (0-dim, on the CPU).
    """
    bits = float64_bits(losses)
    return _mean_loss_compute(bits, sample_ids(ids, len(bits)))


class MeanLoss(ListStateMetric):
    """The mean of per-sample losses over every sample, a repeated sample id counted once.

    Each sample's loss (float64, kept as the bits of an ``int64`` state so that a bf16 cast of the LightningModule
    leaves it exact) and id go into ``cat`` states, so under DDP :meth:`compute` sees the whole split and drops the
    samples a padding ``DistributedSampler`` repeats: the number equals a one-device run whatever the world size,
    where Lightning's ``self.log(loss, sync_dist=True)`` averages batch means, repeats included. Without ``ids``
    every sample counts, repeats included. The mean is taken in float64.

    Example::

        metric = MeanLoss()
        metric.update(F.cross_entropy(logits, labels, reduction="none"), ids=batch["image_id"])
        self.log("val/loss", metric, batch_size=len(labels))

    Args:
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {"loss_bits": torch.int64, **text_state_dtypes("id")}

    loss_bits: list[Tensor]
    id_bytes: list[Tensor]
    id_lengths: list[Tensor]

    def update(self, losses: Tensor, ids: Sequence[int | str | None] | None = None) -> None:
        """Add a batch.

        Args:
            losses: ``[num_samples]`` loss of each sample (``reduction="none"``).
            ids: an id per sample (ImageNet's ``image_id``, NLVR2's ``identifier``); a repeated id is counted once.
                None (or a None id): no de-duplication of those samples.
        """
        bits = float64_bits(losses)
        self.loss_bits.append(bits)
        self._append_texts("id", sample_ids(ids, len(bits)))

    def compute(self) -> Tensor:
        """The mean loss over every sample seen by every rank, each id once.

        Returns:
            A 0-dim float64 tensor on the CPU.
        """
        return _mean_loss_compute(cat_state(self.loss_bits, torch.int64), self._texts("id"))
