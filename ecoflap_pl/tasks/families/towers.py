"""The contrastive towers of a dual-encoder family: how it embeds images and captions, compares them, and runs its
image-text matching (ITM) head. Retrieval and zero-shot classification are written once on top of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class ImageFeatures:
    """What the image tower gives for a batch of images.

    Attributes:
        embeds: L2-normalised contrastive embeddings, ``(B, D)`` (CLIP, BLIP) or ``(B, Q, D)`` (BLIP-2 queries).
        hidden: vision encoder output ``(B, N, H)`` that the ITM head cross-attends to; None without an ITM head.
    """

    embeds: Tensor
    hidden: Tensor | None


class Towers:
    """How one model family embeds images and captions, scores their similarity and runs its ITM head.

    Attributes:
        has_itm: the family has an image-text matching head (BLIP, BLIP-2).
        text_attention_mask: captions are padded to the longest with an attention mask; False: padded to the
            tokenizer's fixed length without a mask, as SigLIP was trained.
        one_embedding_per_image: an image is one embedding compared by cosine similarity, which the streaming
            :class:`~ecoflap_pl.metrics.RetrievalRecall` serves; False (BLIP-2's queries): the split is gathered.
        own_contrastive_loss: the model computes its own image-text loss with ``return_loss=True`` (CLIP's
            contrastive, SigLIP's sigmoid loss); otherwise the task computes InfoNCE over :meth:`similarity`.
    """

    has_itm = False
    text_attention_mask = True
    one_embedding_per_image = True
    own_contrastive_loss = False

    def image(self, model: Any, pixel_values: Tensor) -> ImageFeatures:
        """Normalised image embeddings (and the vision encoder output the ITM head reads)."""
        raise NotImplementedError

    def text(self, model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised caption embeddings ``(T, D)``."""
        raise NotImplementedError

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Cosine similarity ``(num_images, num_texts)``."""
        return image_embeds @ text_embeds.T

    def itm(self, model: Any, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits ``(P, 2)`` (column 1 = match) of ``P`` image-caption pairs."""
        raise NotImplementedError(f"{type(self).__name__} has no image-text matching head.")


def vision_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's vision tower (pixels are cast to it)."""
    return next(model.vision_model.parameters()).dtype


def pooled(output: Any) -> Tensor:
    """The pooled features of a ``get_*_features`` call: transformers >= 5 returns a model output whose
    ``pooler_output`` is projected; 4.x returns the tensor itself."""
    return output if isinstance(output, Tensor) else output.pooler_output
