"""BLIP (``model_type`` ``blip``): captioning with its text decoder, VQA with its answer decoder, retrieval with its
contrastive heads and ITM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipProcessor,
    PretrainedConfig,
    ProcessorMixin,
)
from typing_extensions import override

from ecoflap_pl.models.processors import blip_image_processor
from ecoflap_pl.tasks.families.adapter import FamilyAdapter
from ecoflap_pl.tasks.families.towers import ImageFeatures, Towers, vision_dtype
from ecoflap_pl.tasks.prompt_encoder import PromptEncoder
from ecoflap_pl.tasks.vqa_heads import BlipAnswerDecoder, VQAContext, VQAHead


class BlipTowers(Towers):
    """CLS-token projections of the vision and text encoders; the ITM head is the text encoder cross-attending to
    the image."""

    has_itm = True

    @override
    def image(self, model: BlipForImageTextRetrieval, pixel_values: Tensor) -> ImageFeatures:
        hidden = model.vision_model(pixel_values=pixel_values.to(vision_dtype(model))).last_hidden_state
        return ImageFeatures(F.normalize(model.vision_proj(hidden[:, 0]), dim=-1), hidden)

    @override
    def text(self, model: BlipForImageTextRetrieval, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(model.text_proj(hidden[:, 0]), dim=-1)

    @override
    def itm(
        self, model: BlipForImageTextRetrieval, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        image_mask = torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        output = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=hidden,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        logits: Tensor = model.itm_head(output[:, 0])
        return logits


class BlipFamily(FamilyAdapter):
    """BLIP: the text's first token is replaced by the decoder's BOS (``[DEC]``); generation drops the prompt's
    final ``[SEP]`` before continuing it."""

    @override
    def prompt_encoder(self, processor: ProcessorMixin, config: PretrainedConfig, max_length: int) -> PromptEncoder:
        return PromptEncoder(processor, max_length, decoder_bos_token_id=config.text_config.bos_token_id)

    @override
    def vqa_head(self, context: VQAContext) -> VQAHead:
        bos = context.config.text_config.bos_token_id
        return BlipAnswerDecoder(context.processor, context.max_length, bos)

    @override
    def echoed_prompt(self, config: PretrainedConfig, prompt_ids: Tensor) -> Tensor | None:
        return prompt_ids[:, :-1]


BLIP = BlipFamily(
    "blip",
    "blip",
    {
        "vqa": BlipForQuestionAnswering,
        "captioning": BlipForConditionalGeneration,
        "retrieval": BlipForImageTextRetrieval,
    },
    prompts={"vqa": "{}", "captioning": "a picture of "},  # BLIP reads the bare question
    towers=BlipTowers(),
    image_processor=blip_image_processor,
    processor_class=BlipProcessor,
)
