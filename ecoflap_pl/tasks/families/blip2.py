"""BLIP-2 (``model_type`` ``blip-2``): OPT or FlanT5 behind a Q-Former; captioning, VQA and retrieval."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from typing_extensions import override

from ecoflap_pl.models.processors import blip_image_processor
from ecoflap_pl.tasks.families.adapter import FamilyAdapter, TaskKind
from ecoflap_pl.tasks.families.towers import ImageFeatures, Towers, vision_dtype
from ecoflap_pl.tasks.prompt_encoder import PromptEncoder


class Blip2Towers(Towers):
    """Q-Former image queries and caption embeddings; the ITM head reads queries and caption together."""

    has_itm = True
    one_embedding_per_image = False

    @override
    def image(self, model: Blip2ForImageTextRetrieval, pixel_values: Tensor) -> ImageFeatures:
        hidden = model.vision_model(pixel_values=pixel_values.to(vision_dtype(model))).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(hidden.shape[0], -1, -1),
            encoder_hidden_states=hidden,
            encoder_attention_mask=torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device),
        ).last_hidden_state
        embeds = model.vision_projection(queries.to(model.vision_projection.weight.dtype))
        return ImageFeatures(F.normalize(embeds, dim=-1), hidden)

    @override
    def text(self, model: Blip2ForImageTextRetrieval, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        output = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(model.text_projection(output[:, 0].to(model.text_projection.weight.dtype)), dim=-1)

    @override
    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Best query per image: ``max_q <image_q, text>`` (BLIP-2's ITC), chunked over images to bound memory."""
        num_queries = image_embeds.shape[1]
        chunk = max(1, (1 << 26) // max(num_queries * text_embeds.shape[0], 1))
        return torch.cat(
            [
                torch.einsum("iqd,td->iqt", image_embeds[start : start + chunk], text_embeds).amax(dim=1)
                for start in range(0, image_embeds.shape[0], chunk)
            ]
        )

    @override
    def itm(
        self, model: Blip2ForImageTextRetrieval, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        queries = model.query_tokens.expand(hidden.shape[0], -1, -1)
        num_queries = queries.shape[1]
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        output = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=hidden,
            encoder_attention_mask=torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device),
        ).last_hidden_state
        logits: Tensor = model.itm_head(output[:, :num_queries].to(model.itm_head.weight.dtype)).mean(dim=1)
        return logits


def decoder_only(config: PretrainedConfig) -> bool:
    """Whether the language model is decoder-only (OPT) rather than an encoder-decoder (FlanT5)."""
    return bool(getattr(config, "use_decoder_only_language_model", True))


class Blip2Family(FamilyAdapter):
    """BLIP-2: ``num_query_tokens`` image tokens before the text; OPT targets end with a newline, at which
    generation also stops (LAVIS); FlanT5 reads the prompt in the encoder and the target in the decoder."""

    @override
    def variant(self, config: PretrainedConfig) -> str:
        return "blip2_opt" if decoder_only(config) else "blip2_t5"

    @override
    def check_config(self, config: PretrainedConfig, task: TaskKind) -> None:
        if task == "retrieval" and not getattr(config.qformer_config, "use_qformer_text_input", False):
            raise ValueError(
                "BLIP-2 retrieval needs `qformer_config.use_qformer_text_input` true (the Q-Former encodes the "
                "captions), got false. HINT: use Salesforce/blip2-itm-vit-g or set use_qformer_text_input: true in "
                "qformer_config."
            )

    @override
    def processor_options(self, config: PretrainedConfig) -> dict[str, Any]:
        return {"num_query_tokens": config.num_query_tokens}

    @override
    def prompt_encoder(self, processor: ProcessorMixin, config: PretrainedConfig, max_length: int) -> PromptEncoder:
        opt = decoder_only(config)
        return PromptEncoder(
            processor,
            max_length,
            encoder_decoder=not opt,
            target_suffix="\n" if opt else "",
            prompt_padding_side="left" if opt else "right",
            num_query_tokens=config.num_query_tokens,
            image_token_id=config.image_token_id,
        )

    @override
    def prefix_lm_captions(self, config: PretrainedConfig) -> bool:
        """FlanT5: the prefix-LM loss of the official ECoFLaP coarse step."""
        return not decoder_only(config)

    @override
    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[int] | None:
        """OPT: the model's EOS and, as LAVIS, the newline token if it is one."""
        if not decoder_only(config):
            return None
        ids = [int(config.text_config.eos_token_id)]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1 and newline[0] not in ids:
            ids.append(int(newline[0]))
        return ids

    @override
    def echoed_prompt(self, config: PretrainedConfig, prompt_ids: Tensor) -> Tensor | None:
        """OPT repeats the prompt; FlanT5's output starts with its decoder start token instead."""
        return prompt_ids if decoder_only(config) else None

    @override
    def text_max_positions(self, config: PretrainedConfig) -> int:
        return int(config.qformer_config.max_position_embeddings)


BLIP2 = Blip2Family(
    "blip-2",
    "blip2",
    {
        "vqa": Blip2ForConditionalGeneration,
        "captioning": Blip2ForConditionalGeneration,
        "retrieval": Blip2ForImageTextRetrieval,
    },
    prompts={"vqa": "Question: {} Short answer:", "captioning": "a photo of"},  # ECoFLaP's / LAVIS's prompts
    towers=Blip2Towers(),
    answer_length_penalty=-1.0,  # LAVIS's predict_answers favours short answers
    image_processor=blip_image_processor,
    processor_class=Blip2Processor,
)
