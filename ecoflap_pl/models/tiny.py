"""Tiny random-initialised models of every supported family, built from configs (no downloads).

Tests use them at their default size; the demo builds the same architectures a little larger. Token ids follow
:mod:`ecoflap_pl.models.tokenizers`, so a tokenizer trained with ``train_tokenizer`` fits every config here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import timm
import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipProcessor,
    T5Config,
    T5ForConditionalGeneration,
    ViltConfig,
    ViltForImagesAndTextClassification,
)

from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.models.processors import siglip_image_processor
from ecoflap_pl.models.tokenizers import (
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    PAD_ID,
    QWEN_VISION_TOKENS,
    SEP_ID,
    add_qwen_vision_tokens,
    train_tokenizer,
)


def _stack(hidden: int, layers: int, **extra: Any) -> dict[str, Any]:
    """The size of a transformer stack under the names most Hugging Face configs share: ``layers`` blocks, ``hidden``
    wide, with 4 attention heads and an MLP twice as wide; ``extra`` adds the family's own settings."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        **extra,
    }


def _text_stack(vocab: int, hidden: int, layers: int, **extra: Any) -> dict[str, Any]:
    """A text stack of :func:`_stack`'s size over a ``vocab``-token vocabulary."""
    return {"vocab_size": vocab, **_stack(hidden, layers, **extra)}


def _vision(hidden: int, layers: int, image_size: int, patch_size: int) -> dict[str, Any]:
    # BLIP and BLIP-2 vision configs default to std 1e-10 (their towers are always loaded from pretrained
    # weights); a model trained from scratch needs a real initialisation, or its images all embed alike.
    return _stack(hidden, layers, image_size=image_size, patch_size=patch_size, initializer_range=0.02)


def _opt(vocab: int, hidden: int, layers: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _t5(vocab: int, hidden: int, layers: int) -> T5Config:
    return T5Config.from_dict(
        {
            "vocab_size": vocab,
            "d_model": hidden,
            "d_kv": hidden // 4,
            "d_ff": 2 * hidden,
            "num_layers": layers,
            "num_decoder_layers": layers,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "decoder_start_token_id": PAD_ID,
        }
    )


def _decoder(model_type: str, vocab: int, hidden: int, layers: int, **extra: Any) -> dict[str, Any]:
    """A LLaMA-style decoder with grouped-query attention (4 query heads share 2 key/value heads)."""
    settings = {
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        **extra,
    }
    return {"model_type": model_type, **_text_stack(vocab, hidden, layers, **settings)}


def _qwen_vl(family: str, vocab: int, hidden: int, layers: int, patch_size: int) -> PretrainedConfig:
    """Qwen2-VL / Qwen2.5-VL: the vision special tokens take the last ids of the vocabulary
    (:data:`~ecoflap_pl.models.tokenizers.QWEN_VISION_TOKENS` order), as ``add_qwen_vision_tokens`` appends them."""
    start, end, image, video = range(vocab - len(QWEN_VISION_TOKENS), vocab)
    # multimodal rotary sections (temporal, height, width) over half the head dimension
    head_half = hidden // 4 // 2
    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_half - 2 * (head_half // 3)],
    }
    rope["mrope_section"] += [head_half // 3, head_half // 3]
    text = _decoder(f"{family}_text", vocab, hidden, layers, rope_parameters=rope)
    vision: dict[str, Any] = {
        "depth": 2 * layers,
        "embed_dim": hidden,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_heads": 4,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_5_vl":
        # windows of 2 x 2 merged patches; every second block attends to the whole image, as 7, 15, 23, 31 in 7B
        vision.update(out_hidden_size=hidden, window_size=4 * patch_size, fullatt_block_indexes=[1, 3][:layers])
        config_cls: type[PretrainedConfig] = Qwen2_5_VLConfig
    else:
        config_cls = Qwen2VLConfig
    return config_cls.from_dict(
        {
            "text_config": text,
            "vision_config": vision,
            "image_token_id": image,
            "video_token_id": video,
            "vision_start_token_id": start,
            "vision_end_token_id": end,
        }
    )


def tiny_config(
    family: str,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
    num_labels: int = 2,
) -> PretrainedConfig:
    """The config of a tiny model of ``family`` (one of :data:`HF_FAMILIES`).

    Args:
        family: one of :data:`HF_FAMILIES`.
        vocab_size: text vocabulary size (match the tokenizer's; PaliGemma's processor adds 1152 location and
            segmentation tokens, Qwen's vision tokens take the last four ids).
        hidden_size: width of every tower (divisible by 4: every attention has 4 heads).
        layers: blocks per stack.
        image_size: input resolution of the vision towers.
        patch_size: ViT patch size.
        num_query_tokens: BLIP-2 Q-Former queries.
        num_labels: ViLT NLVR2 classes.
    """
    vision = _vision(hidden_size, layers, image_size, patch_size)
    if family in ("blip2_opt", "blip2_t5"):
        text = _opt(vocab_size, hidden_size, layers) if family == "blip2_opt" else _t5(vocab_size, hidden_size, layers)
        qformer = _text_stack(vocab_size, hidden_size, 1, encoder_hidden_size=hidden_size)
        return Blip2Config.from_dict(
            {
                "vision_config": vision,
                "qformer_config": qformer,
                "text_config": text.to_dict(),
                "num_query_tokens": num_query_tokens,
                "image_token_id": IMAGE_ID,
            }
        )
    if family == "blip":
        text_config = _text_stack(
            vocab_size,
            hidden_size,
            layers,
            encoder_hidden_size=hidden_size,
            max_position_embeddings=64,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=SEP_ID,
            sep_token_id=SEP_ID,
        )
        return BlipConfig(text_config=text_config, vision_config=vision, projection_dim=hidden_size)
    if family == "clip":
        text_config = _text_stack(
            vocab_size,
            hidden_size,
            layers,
            max_position_embeddings=64,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
        return CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=hidden_size)
    if family == "vilt":
        return ViltConfig.from_dict(
            _text_stack(
                vocab_size,
                hidden_size,
                layers,
                image_size=image_size,
                patch_size=patch_size,
                max_position_embeddings=64,
                num_images=2,
                modality_type_vocab_size=3,
                num_labels=num_labels,
                pad_token_id=PAD_ID,
            )
        )
    if family == "t5":
        return _t5(vocab_size, hidden_size, layers)
    if family == "llama":
        return LlamaConfig.from_dict(_decoder("llama", vocab_size, hidden_size, layers, max_position_embeddings=128))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_vl(family, vocab_size, hidden_size, layers, patch_size)
    if family == "llava":
        return LlavaConfig.from_dict(
            {
                "vision_config": {"model_type": "clip_vision_model", **vision},
                "text_config": _decoder("llama", vocab_size, hidden_size, layers),
                "image_token_id": IMAGE_ID,
                "vision_feature_layer": -2,  # LLaVA-1.5 reads the penultimate CLIP layer
                "vision_feature_select_strategy": "default",
            }
        )
    if family == "paligemma":
        text_config = _decoder("gemma", vocab_size, hidden_size, layers, head_dim=hidden_size // 4)
        return PaliGemmaConfig.from_dict(
            {
                "vision_config": {**vision, "projection_dim": hidden_size},
                "text_config": text_config,
                "image_token_id": IMAGE_ID,
                "projection_dim": hidden_size,
                "hidden_size": hidden_size,
            }
        )
    if family == "instructblip":
        # a stack of its own, so that tests see it left out of pruning by the default `exclude`
        qformer = _text_stack(vocab_size, hidden_size, layers, encoder_hidden_size=hidden_size, pad_token_id=PAD_ID)
        return InstructBlipConfig(
            vision_config=vision,
            qformer_config=qformer,
            text_config=_t5(vocab_size, hidden_size, layers).to_dict(),
            num_query_tokens=num_query_tokens,
            image_token_index=IMAGE_ID,
        )
    if family == "siglip":
        text_config = _text_stack(
            vocab_size,
            hidden_size,
            layers,
            max_position_embeddings=16,
            projection_size=hidden_size,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
        )
        return SiglipConfig(text_config=text_config, vision_config=vision)
    raise ValueError(f"`family` must be one of {tuple(HF_FAMILIES)}, got {family!r}.")


HF_FAMILIES: dict[str, type[PreTrainedModel]] = {
    "blip2_opt": Blip2ForConditionalGeneration,
    "blip2_t5": Blip2ForConditionalGeneration,
    "blip": BlipForConditionalGeneration,
    "clip": CLIPModel,
    "vilt": ViltForImagesAndTextClassification,
    "t5": T5ForConditionalGeneration,
    "llama": LlamaForCausalLM,
    "llava": LlavaForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "instructblip": InstructBlipForConditionalGeneration,
    "paligemma": PaliGemmaForConditionalGeneration,
    "siglip": SiglipModel,
}
"""Family -> the Hugging Face class :func:`tiny_model` builds."""

TIMM_ARCHITECTURES = {"vit": "vit_base_patch16_224", "eva": "eva_giant_patch14_224"}
"""Tiny timm families -> the registered architecture they shrink (EVA-ViT-g is BLIP-2's vision tower; its
attention calls ``F.linear`` on the fused qkv weight)."""


def tiny_model(family: str, *, seed: int = 0, **config_kwargs: Any) -> PreTrainedModel:
    """A tiny random-initialised Hugging Face model of ``family``, seeded, in eval mode."""
    config = tiny_config(family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HF_FAMILIES[family](config)
    return model.eval()


def tiny_timm(
    family: str,
    *,
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A tiny random-initialised timm vision transformer: ``family`` is ``"vit"`` or ``"eva"``."""
    if family not in TIMM_ARCHITECTURES:
        raise ValueError(f"`family` must be one of {tuple(TIMM_ARCHITECTURES)}, got {family!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            TIMM_ARCHITECTURES[family],
            pretrained=False,
            num_classes=num_classes,
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=hidden_size,
            depth=layers,
            num_heads=4,
        )
    return model.eval()


PROCESSOR_TEMPLATES = {
    "llava": "bos",
    "qwen2_vl": "none",
    "qwen2_5_vl": "none",
    "instructblip": "eos",
    "paligemma": "none",
    "siglip": "eos",
}
"""Families encoded by a processor of their own -> how their tiny tokenizer wraps a sequence (as the real one)."""

PALIGEMMA_EXTRA_TOKENS = 1024 + 128
"""Location and segmentation tokens PaliGemma's processor adds to its tokenizer."""


def tiny_processor(
    family: str, texts: Iterable[str], vocab_size: int = 160, **config_kwargs: Any
) -> tuple[PretrainedConfig, ProcessorMixin]:
    """The tiny config of a processor-encoded family and its offline processor, sized to each other.

    The tokenizer is trained on ``texts`` (Qwen's vision tokens appended); the config's vocabulary holds every
    token the processor's tokenizer ends up with (PaliGemma's processor adds :data:`PALIGEMMA_EXTRA_TOKENS`).

    Args:
        family: one of :data:`PROCESSOR_TEMPLATES`.
        texts: the tokenizer's corpus.
        vocab_size: most tokens the trained tokenizer keeps.
        config_kwargs: passed to :func:`tiny_config`.
    """
    if family not in PROCESSOR_TEMPLATES:
        raise ValueError(f"`family` must be one of {tuple(PROCESSOR_TEMPLATES)}, got {family!r}.")
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, template=PROCESSOR_TEMPLATES[family])
    if family.startswith("qwen"):
        add_qwen_vision_tokens(tokenizer)
    extra = PALIGEMMA_EXTRA_TOKENS if family == "paligemma" else 0
    config = tiny_config(family, vocab_size=len(tokenizer) + extra, **config_kwargs)
    if family == "siglip":
        return config, SiglipProcessor(siglip_image_processor(config), tokenizer)
    processor = GENERATIVE_FAMILIES[family].offline_processor(config, tokenizer)
    if len(processor.tokenizer) != config.text_config.vocab_size:
        raise RuntimeError(f"The {family} processor's tokenizer does not match the tiny config's vocabulary.")
    return config, processor
