"""BLIP's image-text training losses: symmetric InfoNCE over several positives, and hard-negative ITM pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    Args:
        logits: ``(B, B)`` image-caption similarities divided by the temperature (row i = image i).
        positives: ``(B, B)`` bool, True where caption j describes image i (the diagonal at least); each row's and
            column's targets are spread uniformly over its positives.
    """
    targets = positives.float()
    image_to_text = -(F.log_softmax(logits, dim=1) * targets / targets.sum(dim=1, keepdim=True)).sum(dim=1).mean()
    text_to_image = -(F.log_softmax(logits.T, dim=1) * targets.T / targets.T.sum(dim=1, keepdim=True)).sum(dim=1)
    return (image_to_text + text_to_image.mean()) / 2


def hard_negative_pairs(
    logits: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """BLIP's ITM pairs: every positive pair, plus per image a caption and per caption an image sampled as a hard
    negative with probability ``softmax(logits)`` over the non-positives (rows without any negative get none).

    Args:
        logits: ``(B, B)`` image->caption similarities / temperature.
        positives: ``(B, B)`` bool.
        generator: random source of the draws; None uses the global one.

    Returns:
        ``(image_index, caption_index, label)``, each ``(P,)``; label 1 for a match, 0 for a negative.
    """
    size = logits.shape[0]
    index = torch.arange(size, device=logits.device)
    image_rows, caption_rows, labels = [index], [index], [torch.ones(size, dtype=torch.long, device=logits.device)]
    for weights, is_image_query in ((logits, True), (logits.T, False)):
        weights = (weights.float().softmax(dim=1) + 1e-4).masked_fill(positives if is_image_query else positives.T, 0)
        rows = torch.nonzero(weights.sum(dim=1) > 0).flatten()
        if len(rows) == 0:
            continue
        drawn = torch.multinomial(weights[rows], 1, generator=generator).flatten()
        image_rows.append(rows if is_image_query else drawn)
        caption_rows.append(drawn if is_image_query else rows)
        labels.append(torch.zeros(len(rows), dtype=torch.long, device=logits.device))
    return torch.cat(image_rows), torch.cat(caption_rows), torch.cat(labels)


def same_image(ids: Sequence[Any], device: torch.device) -> Tensor:
    """``(B, B)`` bool: samples sharing an ``image_id`` (only the diagonal where ids are missing)."""
    size = len(ids)
    same = torch.eye(size, dtype=torch.bool, device=device)
    if all(image_id is not None for image_id in ids):
        same |= torch.tensor([[a == b for b in ids] for a in ids], dtype=torch.bool, device=device)
    return same
