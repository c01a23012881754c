"""CLIP and SigLIP (``model_type`` ``clip``, ``siglip``): dual encoders for retrieval and zero-shot classification,
each with its own image-text loss (``return_loss=True``)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel, SiglipModel
from typing_extensions import override

from ecoflap_pl.models.processors import clip_image_processor, siglip_image_processor
from ecoflap_pl.tasks.families.adapter import FamilyAdapter
from ecoflap_pl.tasks.families.towers import ImageFeatures, Towers, pooled, vision_dtype

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipTowers(Towers):
    """The projected pooled features of ``get_image_features`` / ``get_text_features``."""

    own_contrastive_loss = True

    @override
    def image(self, model: Any, pixel_values: Tensor) -> ImageFeatures:
        embeds = pooled(model.get_image_features(pixel_values=pixel_values.to(vision_dtype(model))))
        return ImageFeatures(F.normalize(embeds, dim=-1), None)

    @override
    def text(self, model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)


class SiglipTowers(ClipTowers):
    """SigLIP was trained on prompts padded to 64 tokens without an attention mask, and pools the last token."""

    text_attention_mask = False

    @override
    def text(self, model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(pooled(model.get_text_features(input_ids=input_ids)), dim=-1)


CLIP = FamilyAdapter(
    "clip",
    "clip",
    {"retrieval": CLIPModel, "zero_shot": CLIPModel},
    towers=ClipTowers(),
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
    image_processor=clip_image_processor,
)
SIGLIP = FamilyAdapter(
    "siglip",
    "siglip",
    {"retrieval": SiglipModel, "zero_shot": SiglipModel},
    towers=SiglipTowers(),
    pixel_mean=(0.5, 0.5, 0.5),
    pixel_std=(0.5, 0.5, 0.5),
    image_processor=siglip_image_processor,
)
