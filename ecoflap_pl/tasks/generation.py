"""The prompted generators' shared set-up (VQA, captioning): config, family, processor, model, prompt, generation
settings and end-of-text ids, the model's own LM loss, and text generation from a prompt batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from ecoflap_pl.models.loading import build_hf_model, check_vocabulary, expand_home, placement_kwargs
from ecoflap_pl.tasks.base import EcoflapTask
from ecoflap_pl.tasks.families import FamilyAdapter, TaskKind, resolve_architecture
from ecoflap_pl.tasks.model_config import load_config

log = logging.getLogger(__name__)

LOSS_INPUT_KEYS = (
    "pixel_values",
    "pixel_mask",
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "decoder_input_ids",
    "decoder_attention_mask",
    "labels",
    "image_grid_thw",
    "mm_token_type_ids",
    "qformer_input_ids",
    "qformer_attention_mask",
)
"""Batch keys passed to the model's ``forward`` by :func:`loss_inputs` (those present)."""
GENERATION_IMAGE_KEYS = ("pixel_values", "image_grid_thw")
"""Image inputs :class:`TextGenerator` passes to ``generate`` beside the ``prompt_*`` text inputs."""


def loss_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` that the model's ``forward`` takes (:data:`LOSS_INPUT_KEYS`)."""
    return {key: batch[key] for key in LOSS_INPUT_KEYS if key in batch}


def search_kwargs(num_beams: int, length_penalty: float) -> dict[str, Any]:
    """``generate``'s search arguments: ``length_penalty`` scores beams only, so it goes with ``num_beams > 1`` alone
    (given to greedy search, transformers warns that it is ignored)."""
    return {"num_beams": num_beams, **({"length_penalty": length_penalty} if num_beams > 1 else {})}


def check_generation(num_beams: int, max_new_tokens: int, min_new_tokens: int, max_text_length: int) -> None:
    """Validate the generation settings the tasks take."""
    if num_beams < 1:
        raise ValueError(f"`num_beams` must be >= 1, got {num_beams!r}.")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}.")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"`min_new_tokens` must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}. HINT: lower "
            "min_new_tokens with max_new_tokens."
        )
    if max_text_length < 2:
        raise ValueError(f"`max_text_length` must be >= 2, got {max_text_length!r}.")


@dataclass(frozen=True)
class TextGenerator:
    """Generates from the image inputs and a batch's ``prompt_*`` inputs; returns the new text of each row, stripped.

    Where ``generate`` repeats the prompt before the new tokens (decoder-only language models;
    :meth:`~ecoflap_pl.tasks.families.FamilyAdapter.echoed_prompt`), that part is cut off.

    Attributes:
        family: the model's family.
        config: the model's config.
        tokenizer: decodes the generated ids.
    """

    family: FamilyAdapter
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase

    @torch.no_grad()
    def __call__(self, model: Any, batch: dict[str, Any], **generation_kwargs: Any) -> list[str]:
        """``model.generate`` (of the Hugging Face generation mixin, typed per model class) on ``batch``."""
        prompt_ids = batch["prompt_input_ids"]
        inputs = {key.removeprefix("prompt_"): value for key, value in batch.items() if key.startswith("prompt_")}
        inputs.update({key: batch[key] for key in GENERATION_IMAGE_KEYS if key in batch})
        output = model.generate(**{**inputs, "input_ids": prompt_ids.clone()}, **generation_kwargs)
        echoed = self.family.echoed_prompt(self.config, prompt_ids)
        if echoed is not None:
            length = echoed.shape[1]
            if output.shape[1] >= length and torch.equal(output[:, :length], echoed.to(output.device)):
                output = output[:, length:]
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


class PromptedGenerationTask(EcoflapTask):
    """Base of the tasks whose model answers a prompt about an image (VQA, captioning).

    It resolves the family from the config's ``model_type`` (checked against ``architecture``), builds the processor
    and the model, takes the family's default prompt, checks it, and fixes the beam-search settings with the
    family's end-of-text ids. Subclasses set :attr:`task_kind` and build their collator; ``_prepare(config)`` runs
    after the processor and before the model is built (VQA fixes ViLT's answer vocabulary there).

    The arguments are those of the subclasses (see :class:`~ecoflap_pl.tasks.VQATask` and
    :class:`~ecoflap_pl.tasks.CaptioningTask`); ``length_penalty`` None takes the family's answer length penalty.
    """

    task_kind: ClassVar[TaskKind]
    labels_hint: ClassVar[str]
    """How to get labelled batches, the hint of the error on a batch without ``labels``."""
    model: PreTrainedModel

    def __init__(
        self,
        pretrained: str | None,
        model_config: dict[str, Any] | None,
        tokenizer: str | None,
        architecture: str | None,
        prompt: str | None,
        max_text_length: int,
        num_beams: int,
        max_new_tokens: int,
        min_new_tokens: int,
        length_penalty: float | None,
        from_pretrained_kwargs: dict[str, Any] | None,
        device_map: str | dict[str, Any] | None,
        max_memory: dict[str, Any] | None,
        offload_folder: str | None,
        learning_rate: float,
        weight_decay: float,
        warmup_steps: int,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()  # collects the subclass's arguments too
        pretrained, tokenizer = expand_home(pretrained), expand_home(tokenizer)
        check_generation(num_beams, max_new_tokens, min_new_tokens, max_text_length)
        self.config = load_config(pretrained, model_config, architecture)
        self.architecture, self.family_adapter = resolve_architecture(architecture, self.config, self.task_kind)
        self.family = self.family_adapter.variant(self.config)
        self.prompt = self.family_adapter.prompts[self.task_kind] if prompt is None else prompt
        self.check_prompt(self.prompt)
        self.processor = self.family_adapter.build_processor(self.config, pretrained, tokenizer)
        if tokenizer is not None:
            check_vocabulary(self.tokenizer, self.config, "`tokenizer`")
        self.generate_texts = TextGenerator(self.family_adapter, self.config, self.tokenizer)
        self._prepare(self.config)
        self.model = build_hf_model(
            self.family_adapter.model_classes[self.task_kind],
            pretrained,
            None if pretrained is not None else self.config,
            **placement_kwargs(device_map, max_memory, offload_folder),
            **(from_pretrained_kwargs or {}),
        ).eval()  # as from_pretrained leaves it; EcoflapTask.on_fit_start switches to training mode
        if length_penalty is None:
            length_penalty = self.family_adapter.answer_length_penalty
        self.generation_kwargs: dict[str, Any] = {
            **search_kwargs(num_beams, length_penalty),
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
        }
        eos = self.family_adapter.stop_token_ids(self.tokenizer, self.config)
        if eos is not None:
            self.generation_kwargs["eos_token_id"] = eos

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The processor's tokenizer."""
        tokenizer: PreTrainedTokenizerBase = self.processor.tokenizer
        return tokenizer

    def check_prompt(self, prompt: str) -> None:
        """A family whose prompt marks the image (LLaVA's ``<image>``) must have the mark in ``prompt``."""
        placeholder = self.family_adapter.image_placeholder
        if placeholder is not None and prompt.count(placeholder) != 1:
            raise ValueError(
                f"`prompt` must hold {placeholder!r} once, where {self.architecture} puts the image, got {prompt!r}. "
                f"HINT: e.g. {self.family_adapter.prompts[self.task_kind]!r}."
            )

    def _prepare(self, config: PretrainedConfig) -> None:
        """Adjust ``config`` before the model is built from it (nothing by default)."""

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own LM loss on an annotated batch (``labels`` from the collator)."""
        if "labels" not in batch:
            raise ValueError(
                f"{type(self).__name__} calibration and training batches must carry `labels`, got keys {sorted(batch)}."
                f" HINT: {self.labels_hint}"
            )
        loss: torch.Tensor = self.model(**loss_inputs(batch)).loss
        return loss
