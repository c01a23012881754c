"""The demo BLIP-2: a small ``Blip2ForConditionalGeneration`` (ViT, Q-Former, OPT) trained here on the demo data.

:func:`demo_blip2` returns the directory of the trained model, a ``save_pretrained`` directory with its processor,
which every task loads with ``pretrained: <dir>`` like a hub checkpoint. The first call trains it (about four and a
half minutes on a 2-core CPU with the default preset; on a GPU if there is one); later calls find it in the demo
cache.

Training is the project's own: one ``Trainer.fit`` of a :class:`~ecoflap_pl.tasks.VQATask` built from a config,
on the demo's VQAv2 questions and COCO captions in alternating single-task batches, their images preprocessed once
(:mod:`ecoflap_pl.demo.training`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file
from timm import get_pretrained_cfg
from tokenizers import AddedToken
from transformers import Blip2Config, Blip2ForConditionalGeneration, PreTrainedTokenizerFast

from ecoflap_pl.demo.cache import cached_build, demo_dir
from ecoflap_pl.demo.data import DemoPaths
from ecoflap_pl.demo.datamodules import demo_data
from ecoflap_pl.demo.presets import Blip2Recipe, DemoPreset, VitRecipe, get_preset
from ecoflap_pl.demo.training import MultitaskCollator, VQACaptionMixDataModule, fit
from ecoflap_pl.demo.vit import TIMM_ARCHITECTURE, demo_vit
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import train_tokenizer
from ecoflap_pl.tasks.captioning import DEFAULT_PROMPTS as CAPTION_PROMPTS
from ecoflap_pl.tasks.captioning import CaptionCollator
from ecoflap_pl.tasks.families.blip2 import BLIP2
from ecoflap_pl.tasks.vqa import DEFAULT_PROMPTS as VQA_PROMPTS
from ecoflap_pl.tasks.vqa import VQATask

log = logging.getLogger(__name__)

RECIPE_VERSION = 5
"""Bumped whenever training changes in a way the recipe fields do not show, so cached models are retrained."""
MAX_TEXT_LENGTH = 32


def demo_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer of the demo texts and prompts, wrapped as OPT's (``<s>`` first), with ``"\\n"`` a token.

    LAVIS ends OPT targets with a newline and stops generating at it; the WordPiece normaliser would drop a
    newline, so it is an added token here and the language model learns where answers and captions end.
    """
    prompts = [VQA_PROMPTS["blip2"].format(""), CAPTION_PROMPTS["blip2"]]
    tokenizer = train_tokenizer([*corpus, *prompts], vocab_size=vocab_size, template="bos")
    tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tokenizer


def demo_blip2_config(recipe: Blip2Recipe, vit: VitRecipe, vocab_size: int) -> Blip2Config:
    """The demo BLIP-2 config: :func:`~ecoflap_pl.models.tiny.tiny_config` at the recipe's size, with the demo ViT's
    architecture as its vision tower.

    The Q-Former initialises at ``initializer_range=0.2`` rather than Hugging Face's default (which assumes
    pretrained weights are loaded), so the image reaches the language model strongly from the first steps.
    """
    config = tiny_config(
        "blip2_opt",
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        layers=recipe.language_layers,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        num_query_tokens=recipe.num_query_tokens,
    )
    vision = config.vision_config
    vision.hidden_size = vit.hidden_size
    vision.intermediate_size = vit.mlp_ratio * vit.hidden_size
    vision.num_hidden_layers = vit.layers
    vision.initializer_range = 0.02
    qformer, text = config.qformer_config, config.text_config
    qformer.encoder_hidden_size = vit.hidden_size
    qformer.num_hidden_layers = recipe.qformer_layers
    qformer.cross_attention_frequency = 1
    qformer.initializer_range = 0.2
    qformer.num_attention_heads = text.num_attention_heads = recipe.attention_heads
    qformer.hidden_dropout_prob = qformer.attention_probs_dropout_prob = text.dropout = recipe.dropout
    assert isinstance(config, Blip2Config)  # tiny_config's type for blip2_opt
    return config


def vision_tower_weights(timm_vit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (class token, no ``norm_pre``/``fc_norm``) renamed to a
    ``Blip2VisionModel``'s; the classifier head is dropped.

    The two compute the same function: pre-norm blocks with fused qkv, GELU MLPs and a final LayerNorm (timm's
    ``norm``, BLIP-2's ``post_layernorm``); ``test_demo_models`` checks the features agree.
    """
    renamed = {}
    for name, tensor in timm_vit.items():
        if name.startswith("head."):
            continue
        for old, new in _TIMM_TO_BLIP2_VISION:
            name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


_TIMM_TO_BLIP2_VISION = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.", "encoder.layers."),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm.", "post_layernorm."),
)


def train_demo_blip2(out: Path, paths: DemoPaths, preset: DemoPreset, vit_weights: Path) -> None:
    """Train the demo BLIP-2 on the demo VQA questions and captions, its vision tower starting from the trained
    demo ViT (``vit_weights``); write it and its processor to ``out``."""
    recipe = preset.blip2
    corpus = paths.corpus.read_text(encoding="utf-8").splitlines()
    tokenizer = demo_tokenizer(corpus, recipe.vocab_size)
    tokenizer.save_pretrained(out)
    vocab_size = -(-len(tokenizer) // 8) * 8
    config = demo_blip2_config(recipe, preset.vit, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        task = VQATask(
            model_config=config.to_dict(),
            tokenizer=str(out),
            max_text_length=MAX_TEXT_LENGTH,
            learning_rate=recipe.learning_rate,
            warmup_steps=max(1, recipe.steps // 20),
        )
    model = cast(Blip2ForConditionalGeneration, task.model)
    with torch.no_grad():  # LAVIS initialises the queries; Hugging Face leaves zeros for a checkpoint to fill
        model.query_tokens.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(recipe.seed))
    model.vision_model.load_state_dict(vision_tower_weights(load_file(vit_weights)))
    model.vision_model.requires_grad_(not recipe.freeze_vision)  # the optimizer only takes trainable weights
    vit_input = get_pretrained_cfg(TIMM_ARCHITECTURE)  # the ViT's input normalisation goes with its weights
    assert vit_input is not None, TIMM_ARCHITECTURE  # a timm architecture: its config is always registered
    task.processor.image_processor.image_mean = list(vit_input.mean)
    task.processor.image_processor.image_std = list(vit_input.std)
    encoder = BLIP2.prompt_encoder(task.processor, task.config, MAX_TEXT_LENGTH)
    captions = CaptionCollator(encoder, prompt=CAPTION_PROMPTS["blip2"], prefix_lm=False)
    data = VQACaptionMixDataModule(
        paths.coco,
        batch_size=recipe.batch_size,
        collate_fn=MultitaskCollator(task.collator, captions),
        preprocess=encoder.pixel_values,
        shuffle_seed=recipe.seed,
    )
    log.info("Training the demo BLIP-2 (%d steps); it is cached in %s", recipe.steps, out.parent)
    fit(task, data, recipe.steps, recipe.seed, "Training the demo BLIP-2")
    model.save_pretrained(out)
    task.processor.save_pretrained(out)


def demo_blip2(preset: str = "default", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The trained demo BLIP-2 of ``preset``: its ``save_pretrained`` directory (model and processor).

    Trained on the first call (the demo data is built first if needed), then reused from the demo cache
    (:func:`~ecoflap_pl.demo.cache.demo_dir`) while the preset, the recipe and the data stay the same.
    """
    chosen = get_preset(preset)
    paths = demo_data(preset, cache_dir)
    params = chosen.model_marker("blip2", RECIPE_VERSION, recipe=chosen.blip2, vit=chosen.vit)
    vit_weights = demo_vit(preset, cache_dir)
    target = demo_dir(cache_dir) / "models" / f"blip2-{chosen.name}"
    return cached_build(target, params, lambda out: train_demo_blip2(out, paths, chosen, vit_weights))
