"""Image captioning with BLIP-2 (OPT or FlanT5), BLIP and the generative families (LLaVA, Qwen-VL, InstructBLIP,
PaliGemma): LM fine-tuning loss, beam-search captions, COCO scores."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration
from typing_extensions import override

from ecoflap_pl.metrics import CaptionScores
from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.models.loading import build_hf_model, placement_kwargs
from ecoflap_pl.tasks._processor_prompts import ProcessorPromptEncoder
from ecoflap_pl.tasks._vision_language import (
    PromptEncoder,
    build_processor,
    check_generation,
    check_image_placeholder,
    family_of,
    generate_texts,
    load_config,
    loss_inputs,
    prefix_split,
    resolve_architecture,
    search_kwargs,
    stop_token_ids,
)
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)

MODEL_CLASSES = {
    "blip2": Blip2ForConditionalGeneration,
    "blip": BlipForConditionalGeneration,
    **{name: family.model_class for name, family in GENERATIVE_FAMILIES.items()},
}
DEFAULT_PROMPTS = {
    "blip2": "a photo of",
    "blip": "a picture of ",
    **{name: family.caption_prompt for name, family in GENERATIVE_FAMILIES.items()},
}
"""LAVIS's BLIP-2 captioning prompt, BLIP's, and the generative families' own."""


class CaptionCollator:
    """Turns caption sample dicts into a batch for a prompted generator.

    - Training samples ``{"image", "text"}`` (``"image_id"`` optional, as in image-text pairs):
      ``pixel_values``, ``input_ids``, ``attention_mask``, ``labels`` (see :class:`PromptEncoder`), ``image_id``
      and ``text`` lists. With ``prefix_lm`` the caption is split by :func:`prefix_split` and the model learns the
      rest given the prefix (the prompt is not used); otherwise it learns the caption given the prompt.
    - Evaluation samples ``{"image", "image_id", "references"}``: ``pixel_values``, ``prompt_input_ids``,
      ``prompt_attention_mask``, ``image_id`` and ``references`` lists (samples without ``"text"`` and without
      ``"references"``, e.g. for prediction, give the same batch without ``references``).

    Args:
        encoder: the model's :class:`PromptEncoder` (BLIP-2, BLIP) or :class:`ProcessorPromptEncoder`.
        prompt: the caption prompt.
        prefix_lm: train with the prefix-LM split instead of the prompt.
        prefix_lm_seed: seed of the split positions.
    """

    def __init__(
        self, encoder: PromptEncoder | ProcessorPromptEncoder, prompt: str, prefix_lm: bool, prefix_lm_seed: int = 0
    ) -> None:
        self.encoder = encoder
        self.prompt = prompt
        self.prefix_lm = prefix_lm
        self.prefix_lm_seed = prefix_lm_seed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("`samples` must hold at least one sample, got an empty list.")
        with_text = sum("text" in sample for sample in samples)
        if with_text == len(samples):
            return self._training(samples)
        if with_text == 0:
            return self._evaluation(samples)
        raise ValueError(
            "Caption samples must all be training samples {'image', 'image_id', 'text'} or all evaluation samples "
            f"{{'image', 'image_id', 'references'}}, got keys {[sorted(sample) for sample in samples]}."
        )

    def _training(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [sample["text"] for sample in samples]
        if self.prefix_lm:
            prompts, targets = zip(*(prefix_split(caption, self.prefix_lm_seed) for caption in captions), strict=True)
        else:
            prompts, targets = [_with_space(self.prompt)] * len(captions), captions
        batch = self.encoder.loss_batch(samples, prompts, targets)
        batch["image_id"] = [sample.get("image_id") for sample in samples]
        batch["text"] = captions
        return batch

    def _evaluation(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.encoder.prompt_batch(samples, [self.prompt] * len(samples))
        batch["image_id"] = [sample.get("image_id") for sample in samples]
        if all("references" in sample for sample in samples):
            batch["references"] = [list(sample["references"]) for sample in samples]
        return batch


def _with_space(prompt: str) -> str:
    return prompt if not prompt or prompt[-1].isspace() else prompt + " "


class CaptioningTask(EcoflapTask):
    """Image captioning: BLIP-2 (``Blip2ForConditionalGeneration``, OPT or FlanT5), BLIP
    (``BlipForConditionalGeneration``), or a generative family: LLaVA, Qwen2-VL / Qwen2.5-VL (the prompt is the
    user turn of the chat template), InstructBLIP, PaliGemma (``"caption en"``).

    Loss (``calibration_loss`` and ``training_step``): the model's own LM loss. BLIP-2 OPT and BLIP: the caption
    after the prompt, prompt, padding and image tokens masked out. BLIP-2 FlanT5: the prefix-LM loss of the
    official ECoFLaP coarse step (the caption split at a random character in ``[1, len/2]``, seeded per caption;
    the prefix is the encoder text, the rest the decoder target). Validation and test: beam search from the
    prompt, scored with :class:`~ecoflap_pl.metrics.CaptionScores` and logged as ``val/<key>`` / ``test/<key>``
    (``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider``). ``predict_step`` returns
    ``[{"image_id", "caption"}]``.

    Args:
        pretrained: a ``from_pretrained`` name or directory (``Salesforce/blip2-opt-2.7b``,
            ``Salesforce/blip-image-captioning-base``); the processor is loaded from it with ``AutoProcessor``.
        model_config: a BLIP-2 or BLIP config as a dict (``to_dict()``), for a random-initialised model.
        tokenizer: a saved tokenizer directory; required with ``model_config``, optional with ``pretrained``
            (replaces the processor's tokenizer).
        architecture: ``"blip2"``, ``"blip"`` or a generative family (``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_vl"``,
            ``"instructblip"``, ``"paligemma"``); None infers it from the config's ``model_type``.
        prompt: the caption prompt; None: ``"a photo of"`` (BLIP-2), ``"a picture of "`` (BLIP), or the family's
            own (:data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES`).
        prefix_lm: train with the prefix-LM split; None: only BLIP-2 with an encoder-decoder language model.
        prefix_lm_seed: seed of the prefix-LM split positions.
        max_text_length: text tokens kept per caption (LAVIS: 32).
        num_beams: beam width of caption generation.
        max_new_tokens: longest caption generated, in tokens.
        min_new_tokens: shortest caption generated, in tokens (LAVIS COCO: 8).
        length_penalty: beam-search length penalty.
        repetition_penalty: repetition penalty (1.0 = none).
        from_pretrained_kwargs: extra ``from_pretrained`` arguments (``dtype``, ``revision``, ...).
        device_map: Accelerate's big-model placement of a ``pretrained`` model: ``"auto"`` (fill the GPUs, then the
            CPU, then disk), ``"balanced"``, or a dict module name -> device (``0``, ``"cpu"``, ``"disk"``). The model
            stays where it is placed: pruning runs each block on the device that holds it and loads offloaded
            weights one block at a time; the report records the placement.
        max_memory: the most each device may hold with ``device_map``, e.g. ``{0: "70GiB", "cpu": "200GiB"}``.
        offload_folder: where weights offloaded to disk (and their pruned versions) are written.
        learning_rate: AdamW peak learning rate (BLIP COCO fine-tuning: 1e-5).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        architecture: str | None = None,
        prompt: str | None = None,
        prefix_lm: bool | None = None,
        prefix_lm_seed: int = 0,
        max_text_length: int = 32,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        from_pretrained_kwargs: dict[str, Any] | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[str, Any] | None = None,
        offload_folder: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        check_generation(num_beams, max_new_tokens, min_new_tokens, max_text_length)
        config = load_config(pretrained, model_config, architecture)
        self.architecture = resolve_architecture(architecture, config, tuple(MODEL_CLASSES))
        self.family = family_of(self.architecture, config)
        self.processor = build_processor(self.architecture, config, pretrained, tokenizer)
        self.model = build_hf_model(
            MODEL_CLASSES[self.architecture],
            pretrained,
            None if pretrained is not None else config,
            **placement_kwargs(device_map, max_memory, offload_folder),
            **(from_pretrained_kwargs or {}),
        ).eval()  # as from_pretrained leaves it; EcoflapTask.on_fit_start switches to training mode
        self.prompt = DEFAULT_PROMPTS[self.architecture] if prompt is None else prompt
        check_image_placeholder(self.architecture, self.prompt)
        self.prefix_lm = self.family == "blip2_t5" if prefix_lm is None else prefix_lm
        encoder: PromptEncoder | ProcessorPromptEncoder
        if self.family in GENERATIVE_FAMILIES:
            encoder = ProcessorPromptEncoder(self.processor, GENERATIVE_FAMILIES[self.family], config, max_text_length)
        else:
            encoder = PromptEncoder(
                self.processor,
                self.family,
                max_length=max_text_length,
                num_query_tokens=getattr(config, "num_query_tokens", 0),
                image_token_id=getattr(config, "image_token_id", None),
                decoder_bos_token_id=config.text_config.bos_token_id if self.family == "blip" else None,
            )
        self.collator = CaptionCollator(
            encoder,
            prompt=self.prompt,
            prefix_lm=self.prefix_lm,
            prefix_lm_seed=prefix_lm_seed,
        )
        self.generation_kwargs: dict[str, Any] = {
            **search_kwargs(num_beams, length_penalty),
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "repetition_penalty": repetition_penalty,
        }
        eos = stop_token_ids(self.family, self.processor.tokenizer, config)
        if eos is not None:
            self.generation_kwargs["eos_token_id"] = eos
        self.scores: dict[str, CaptionScores] = {}  # built at the first evaluation: the scorers need Java
        log.info(
            "CaptioningTask: %s (%s), prompt %r, prefix-LM %s",
            self.architecture,
            self.family,
            self.prompt,
            self.prefix_lm,
        )

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's LM loss on a batch of training samples (``labels`` from the collator)."""
        if "labels" not in batch:
            raise ValueError(
                "Captioning calibration and training batches must carry `labels`, got keys "
                f"{sorted(batch)}. HINT: they are built from training samples {{'image', 'text'}}."
            )
        return self.model(**loss_inputs(batch)).loss

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Beam-search captions of an evaluation batch (``prompt_input_ids``), without the prompt."""
        if "prompt_input_ids" not in batch:
            raise ValueError(
                f"Caption generation needs an evaluation batch with `prompt_input_ids`, got keys {sorted(batch)}. "
                "HINT: evaluation samples are {'image', 'image_id', 'references'}."
            )
        return generate_texts(self.model, self.family, self.processor.tokenizer, batch, **self.generation_kwargs)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        captions = self.generate(batch)
        return [{"image_id": i, "caption": c} for i, c in zip(batch["image_id"], captions, strict=True)]

    def _score(self, batch: dict[str, Any], stage: str) -> None:
        if "references" not in batch:
            raise ValueError(
                "Caption evaluation batches must carry `references`, got none. HINT: evaluation samples are "
                "{'image', 'image_id', 'references'}."
            )
        captions = self.generate(batch)
        ids = batch["image_id"] if all(i is not None for i in batch["image_id"]) else None
        if stage not in self.scores:
            self.scores[stage] = CaptionScores().to(self.device)
        self.scores[stage].update(captions, batch["references"], ids=ids)

    def _log_scores(self, stage: str) -> None:
        scores = self.scores.get(stage)
        if scores is None:
            return
        skip = scores.update_count == 0 or self.trainer.sanity_checking  # not worth starting the scorers' JVMs
        values = {} if skip else scores.compute()
        scores.reset()
        if values:
            for key, value in values.items():
                self.log(f"{stage}/{key}", value, prog_bar=key == "cider")
