"""Perplexity over every target token of a split, each sample id once (the logged ``val/perplexity``,
``test/perplexity``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ecoflap_pl.metrics._states import ListStateMetric, cat_state, sample_ids
from ecoflap_pl.metrics.loss import MeanLoss, float64_bits, kept_losses


def _check_ignore_index(ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(
            f"`ignore_index` must be an int, got {ignore_index!r}. HINT: -100, the label of padding in PyTorch and "
            "Hugging Face models."
        )
    return ignore_index


def _token_losses(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Each sample's summed negative log-likelihood (``float64 [N]``) and its number of target tokens (``int64 [N]``).

    ``logits [N, T, V]`` score ``labels [N, T]`` position by position; labels equal to ``ignore_index`` count neither.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or labels.is_floating_point():
        raise ValueError(
            "`logits` must be [num_samples, seq_len, vocab_size] and `labels` integer [num_samples, seq_len], got "
            f"shapes {tuple(logits.shape)} and {tuple(labels.shape)} of {labels.dtype}. HINT: pair each position with "
            "the token it predicts; for a causal decoder, logits[:, :-1] and labels[:, 1:]."
        )
    # per token in fp32 (what torchmetrics' Perplexity takes the log of), summed per sample in float64
    nll = F.cross_entropy(
        logits.detach().float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
    )
    sums = nll.view(labels.shape).to(torch.float64).sum(dim=1)
    return sums, (labels != ignore_index).sum(dim=1).to(torch.int64)


def _perplexity_compute(bits: Tensor, keys: Sequence[str], counts: Tensor) -> Tensor:
    """``exp`` of the summed losses in ``bits`` over the summed token ``counts``, a repeated key counted once."""
    losses, keep = kept_losses(bits, keys)
    total = int(counts.cpu()[keep].sum())
    if total == 0:
        raise ValueError(
            "The loss per token needs at least one target token, got none: every label is the ignore_index. HINT: "
            "check the labels; a document needs two tokens for a causal model to predict one (labels[:, 1:])."
        )
    return (losses[keep].sum() / total).exp()


def token_perplexity(
    logits: Tensor, labels: Tensor, ids: Sequence[int | str | None] | None = None, ignore_index: int = -100
) -> Tensor:
    """Functional form of :class:`TokenPerplexity` (same arguments as its constructor and ``update``).

    Returns:
        ``exp`` of the mean negative log-likelihood per target token, each id once (0-dim float64, on the CPU).
    """
    sums, counts = _token_losses(logits, labels, _check_ignore_index(ignore_index))
    return _perplexity_compute(float64_bits(sums), sample_ids(ids, len(sums)), counts)


class TokenPerplexity(ListStateMetric):
    """Perplexity over every target token seen, the tokens of a repeated sample id counted once.

    ``exp(Σ_i nll_i / Σ_i n_i)`` over the unique samples ``i``, where ``nll_i`` is the sum of ``-log p(label)`` over
    the ``n_i`` target tokens of sample ``i`` (labels equal to ``ignore_index`` count neither): torchmetrics'
    ``Perplexity`` on one process. That class keeps only the two sums, so under DDP it counts again the samples a
    padding ``DistributedSampler`` repeats; this one keeps each sample's sum (float64, as the bits of an ``int64``
    state, like :class:`~ecoflap_pl.metrics.MeanLoss`), token count and id in ``cat`` states, so :meth:`compute` sees
    the whole split and equals a one-device run whatever the world size. All states are integers, so a bf16 cast of
    the LightningModule leaves them exact. Without ``ids`` every sample counts, repeats included.

    Example::

        metric = TokenPerplexity()
        logits = model(**inputs).logits
        metric.update(logits[:, :-1], inputs["labels"][:, 1:], ids=batch["text_id"])  # causal: t predicts t + 1
        self.log("val/perplexity", metric, batch_size=len(logits))

    Args:
        ignore_index: the label of positions that are no target (padding, an encoder-decoder's prefix).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {**MeanLoss._list_state_dtypes, "token_counts": torch.int64}

    loss_bits: list[Tensor]
    token_counts: list[Tensor]
    id_bytes: list[Tensor]
    id_lengths: list[Tensor]

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = _check_ignore_index(ignore_index)

    def update(self, logits: Tensor, labels: Tensor, ids: Sequence[int | str | None] | None = None) -> None:
        """Add a batch.

        Args:
            logits: ``[num_samples, seq_len, vocab_size]`` scores of the token at each position of ``labels``.
            labels: ``[num_samples, seq_len]`` target token ids, ``ignore_index`` where there is no target.
            ids: an id per sample (the document's ``text_id``); the tokens of a repeated id are counted once.
                None (or a None id): no de-duplication of those samples.
        """
        sums, counts = _token_losses(logits, labels, self.ignore_index)
        self.loss_bits.append(float64_bits(sums))
        self.token_counts.append(counts)
        self._append_texts("id", sample_ids(ids, len(sums)))

    def compute(self) -> Tensor:
        """Perplexity over every target token of every rank, each id's tokens once.

        Returns:
            A 0-dim float64 tensor on the CPU.
        """
        counts = cat_state(self.token_counts, torch.int64)
        return _perplexity_compute(cat_state(self.loss_bits, torch.int64), self._texts("id"), counts)
