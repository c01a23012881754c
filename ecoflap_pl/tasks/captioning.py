"""Image captioning with BLIP-2 (OPT or FlanT5), BLIP and the generative families (LLaVA, Qwen-VL, InstructBLIP,
PaliGemma): LM fine-tuning loss, beam-search captions, COCO scores."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from typing_extensions import override

from ecoflap_pl.metrics import CaptionScores
from ecoflap_pl.tasks.families import TaskKind, serving
from ecoflap_pl.tasks.generation import PromptedGenerationTask
from ecoflap_pl.tasks.labels import prefix_split
from ecoflap_pl.tasks.prompt_encoder import PromptEncoding

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = {family.architecture: family.prompts["captioning"] for family in serving("captioning")}
"""Each family's default captioning prompt (LAVIS's BLIP-2 prompt, BLIP's, the generative families' own)."""


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
        encoder: the family's prompt encoder (:class:`~ecoflap_pl.tasks.prompt_encoder.PromptEncoder` for BLIP-2 and
            BLIP, :class:`~ecoflap_pl.tasks.processor_prompt_encoder.ProcessorPromptEncoder` for the generative
            families).
        prompt: the caption prompt.
        prefix_lm: train with the prefix-LM split instead of the prompt.
        prefix_lm_seed: seed of the split positions.
    """

    def __init__(self, encoder: PromptEncoding, prompt: str, prefix_lm: bool, prefix_lm_seed: int = 0) -> None:
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
            splits = [prefix_split(caption, self.prefix_lm_seed) for caption in captions]
            prompts, targets = [prefix for prefix, _ in splits], [rest for _, rest in splits]
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


class CaptioningTask(PromptedGenerationTask):
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

    task_kind: ClassVar[TaskKind] = "captioning"
    labels_hint = "they are built from training samples {'image', 'text'}."

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
        super().__init__(
            pretrained=pretrained,
            model_config=model_config,
            tokenizer=tokenizer,
            architecture=architecture,
            prompt=prompt,
            max_text_length=max_text_length,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            from_pretrained_kwargs=from_pretrained_kwargs,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
        )
        self.generation_kwargs["repetition_penalty"] = repetition_penalty
        self.prefix_lm = self.family_adapter.prefix_lm_captions(self.config) if prefix_lm is None else prefix_lm
        self.collator = CaptionCollator(
            self.family_adapter.prompt_encoder(self.processor, self.config, max_text_length),
            prompt=self.prompt,
            prefix_lm=self.prefix_lm,
            prefix_lm_seed=prefix_lm_seed,
        )
        self.scores: dict[str, CaptionScores] = {}  # built at the first evaluation: the scorers need Java
        log.info(
            "CaptioningTask: %s (%s), prompt %r, prefix-LM %s",
            self.architecture,
            self.family,
            self.prompt,
            self.prefix_lm,
        )

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Beam-search captions of an evaluation batch (``prompt_input_ids``), without the prompt."""
        if "prompt_input_ids" not in batch:
            raise ValueError(
                f"Caption generation needs an evaluation batch with `prompt_input_ids`, got keys {sorted(batch)}. "
                "HINT: evaluation samples are {'image', 'image_id', 'references'}."
            )
        return self.generate_texts(self.model, batch, **self.generation_kwargs)

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
