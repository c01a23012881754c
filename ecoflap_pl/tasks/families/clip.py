"""CLIP and SigLIP (``model_type`` ``clip``, ``siglip``): dual encoders for retrieval and zero-shot classification,
each with its own image-text loss (``return_loss=True``)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPImageProcessor, CLIPModel, PretrainedConfig, SiglipModel
from typing_extensions import override

from ecoflap_pl.models.processors import siglip_image_processor
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


class ClipFamily(FamilyAdapter):
    """CLIP: resize of the shortest edge and center crop to the vision tower's size."""

    @override
    def offline_image_processor(self, config: PretrainedConfig) -> Any:
        size = config.vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class SiglipFamily(FamilyAdapter):
    """SigLIP: resize to the vision tower's size, mean = std = 0.5."""

    @override
    def offline_image_processor(self, config: PretrainedConfig) -> Any:
        return siglip_image_processor(config)


CLIP = ClipFamily(
    "clip",
    "clip",
    {"retrieval": CLIPModel, "zero_shot": CLIPModel},
    towers=ClipTowers(),
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
)
SIGLIP = SiglipFamily(
    "siglip",
    "siglip",
    {"retrieval": SiglipModel, "zero_shot": SiglipModel},
    towers=SiglipTowers(),
    pixel_mean=(0.5, 0.5, 0.5),
    pixel_std=(0.5, 0.5, 0.5),
)
