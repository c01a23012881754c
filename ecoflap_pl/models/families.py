"""Prompted vision-language generators fed through their own processor: a registry of family descriptions.

Each family is data: its Hugging Face class, its prompt formats, how its processor turns a prompt into text (plain,
or the processor's chat template), whether the processor builds the labels itself, and how to build a processor
offline for a config-only model. The tasks read these fields instead of switching on model names; a new family is
one more entry in :data:`GENERATIVE_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    InstructBlipForConditionalGeneration,
    LlavaForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from ecoflap_pl.models.processors import (
    instructblip_processor,
    llava_processor,
    paligemma_processor,
    qwen_vl_processor,
)

OfflineProcessor = Callable[[PretrainedConfig, PreTrainedTokenizerBase], ProcessorMixin]


@dataclass(frozen=True)
class GenerativeFamily:
    """How one family of prompted vision-language generators is prompted, trained and decoded.

    Attributes:
        name: the family's name (its ``model_type``).
        model_class: the Hugging Face class that generates and computes the LM loss.
        vqa_prompt: default VQA prompt, one ``{}`` for the question.
        caption_prompt: default captioning prompt.
        chat: the prompt is the user's text turn; the processor's chat template adds the image and the turn markers.
        image_placeholder: a token the prompt itself must hold where the image goes (LLaVA's ``<image>``); None when
            the processor inserts the image tokens.
        labels_from_suffix: the processor builds ``labels`` (and ``token_type_ids``) from ``suffix=`` (PaliGemma).
        offline_processor: builds the processor of a config-only model from a tokenizer (tests, the demo).
    """

    name: str
    model_class: type[PreTrainedModel]
    vqa_prompt: str
    caption_prompt: str
    offline_processor: OfflineProcessor
    chat: bool = False
    image_placeholder: str | None = None
    labels_from_suffix: bool = False

    @staticmethod
    def encoder_decoder(config: PretrainedConfig) -> bool:
        """Whether the language model is an encoder-decoder (InstructBLIP FlanT5): the prompt goes to the encoder
        and the target to the decoder, and generation does not echo the prompt."""
        return not getattr(config, "use_decoder_only_language_model", True)


_QWEN = {
    "vqa_prompt": "{} Answer the question using a single word or phrase.",  # Qwen-VL's VQAv2 evaluation prompt
    "caption_prompt": "Describe the image in one sentence.",
    "offline_processor": qwen_vl_processor,
    "chat": True,
}

GENERATIVE_FAMILIES: dict[str, GenerativeFamily] = {
    "llava": GenerativeFamily(
        "llava",
        LlavaForConditionalGeneration,
        vqa_prompt="USER: <image>\n{} ASSISTANT:",  # LLaVA-1.5's conversation format
        caption_prompt="USER: <image>\nDescribe the image in one sentence. ASSISTANT:",
        offline_processor=llava_processor,
        image_placeholder="<image>",
    ),
    "qwen2_vl": GenerativeFamily("qwen2_vl", Qwen2VLForConditionalGeneration, **_QWEN),  # type: ignore[arg-type]
    "qwen2_5_vl": GenerativeFamily("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, **_QWEN),  # type: ignore[arg-type]
    "instructblip": GenerativeFamily(
        "instructblip",
        InstructBlipForConditionalGeneration,
        vqa_prompt="Question: {} Short answer:",  # InstructBLIP's short-answer VQA instruction
        caption_prompt="A short image description:",
        offline_processor=instructblip_processor,
    ),
    "paligemma": GenerativeFamily(
        "paligemma",
        PaliGemmaForConditionalGeneration,
        vqa_prompt="answer en {}",
        caption_prompt="caption en",
        offline_processor=paligemma_processor,
        labels_from_suffix=True,
    ),
}
"""``config.model_type`` -> its family."""
