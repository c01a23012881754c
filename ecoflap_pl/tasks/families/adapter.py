"""The family adapter: everything the tasks need to know about one model family, in one object.

A task never switches on a family's name. It looks the family up by the config's ``model_type``
(:func:`~ecoflap_pl.tasks.families.registry.family_for`) and asks the adapter: the Hugging Face class that serves
the task, the default prompts, the processor of a config-only model, the prompt encoder, the end-of-text ids, how
much of the prompt generation echoes, and the contrastive towers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from ecoflap_pl.models.loading import check_tokenizer_source, load_tokenizer
from ecoflap_pl.tasks.families.towers import Towers
from ecoflap_pl.tasks.prompt_encoder import PromptEncoding
from ecoflap_pl.tasks.vqa_heads import GeneratedAnswers, VQAContext, VQAHead

TaskKind = Literal["vqa", "captioning", "retrieval", "zero_shot", "nlvr2"]
"""The tasks a family can serve (the keys of :attr:`FamilyAdapter.model_classes`)."""


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family as the tasks see it. Subclasses override the methods their family needs.

    Attributes:
        model_type: the Hugging Face ``config.model_type`` (the registry key).
        architecture: the name the tasks' ``architecture`` argument takes (``"blip2"`` for ``"blip-2"``).
        model_classes: task -> the Hugging Face class that serves it.
        prompts: task -> the default prompt (VQA: one ``{}`` for the question).
        towers: the contrastive towers (retrieval, zero-shot classification); None for other families.
        answer_length_penalty: the beam-search length penalty of VQA answers when the task leaves it unset.
        image_placeholder: a token the prompt itself must hold where the image goes (LLaVA's ``<image>``); None
            when the processor (or the model) puts the image tokens.
        pixel_mean: the image normalisation of zero-shot classification, with ``pixel_std``; None: not a zero-shot
            classifier.
        pixel_std: see ``pixel_mean``.
        image_processor: builds the image processor of a config-only model (tests, the demo) from its config.
        processor_class: the processor around an image processor and a tokenizer
            (:meth:`processor_options` adds its other arguments).
    """

    model_type: str
    architecture: str
    model_classes: Mapping[str, type[PreTrainedModel]]
    prompts: Mapping[str, str] = field(default_factory=dict)
    towers: Towers | None = None
    answer_length_penalty: float = 1.0
    image_placeholder: str | None = None
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    image_processor: Callable[[PretrainedConfig], Any] | None = None
    processor_class: type[ProcessorMixin] | None = None

    def variant(self, config: PretrainedConfig) -> str:
        """The name the generation tasks record as ``family`` (BLIP-2 splits into ``blip2_opt`` / ``blip2_t5``)."""
        return self.architecture

    def check_config(self, config: PretrainedConfig, task: TaskKind) -> None:
        """Refuse a config this family cannot serve ``task`` with (a clear error before the model is built)."""

    def processor_parts(
        self, config: PretrainedConfig, pretrained: str | None, tokenizer: str | None
    ) -> tuple[Any, PreTrainedTokenizerBase]:
        """``(image processor, tokenizer)`` of the model.

        With ``pretrained``: the image processor (and tokenizer unless ``tokenizer`` is given) of
        ``AutoProcessor.from_pretrained(pretrained)``. With a config only: :meth:`offline_image_processor` and
        ``tokenizer``, which is then required.

        Raises:
            ValueError: no tokenizer with a config-built model, or a saved processor without an image processor or
                a tokenizer.
        """
        if pretrained is None:
            check_tokenizer_source(config, tokenizer)
            return self.offline_image_processor(config), load_tokenizer(str(tokenizer))
        custom_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        loaded = AutoProcessor.from_pretrained(pretrained)
        image_processor = getattr(loaded, "image_processor", None)
        text_tokenizer = custom_tokenizer or getattr(loaded, "tokenizer", None)
        if image_processor is None or text_tokenizer is None:
            raise ValueError(
                f"`pretrained` {pretrained!r} must hold a processor with an image processor and a tokenizer, got "
                f"{type(loaded).__name__}. HINT: save the processor next to the model with "
                "processor.save_pretrained(dir)."
            )
        return image_processor, text_tokenizer

    def build_processor(
        self, config: PretrainedConfig, pretrained: str | None, tokenizer: str | None
    ) -> ProcessorMixin:
        """The model's processor: :meth:`processor` around :meth:`processor_parts`."""
        return self.processor(*self.processor_parts(config, pretrained, tokenizer), config)

    def offline_image_processor(self, config: PretrainedConfig) -> Any:
        """The image processor of a config-only model (tests, the demo), sized from the config."""
        if self.image_processor is None:
            raise NotImplementedError(f"{self.model_type} has no image processor for a config-only model.")
        return self.image_processor(config)

    def processor(
        self, image_processor: Any, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig
    ) -> ProcessorMixin:
        """The model's processor around an image processor and a tokenizer."""
        if self.processor_class is None:
            raise NotImplementedError(f"{self.model_type} has no processor class.")
        return self.processor_class(image_processor, tokenizer, **self.processor_options(config))

    def processor_options(self, config: PretrainedConfig) -> dict[str, Any]:
        """Arguments of :attr:`processor_class` besides the image processor and the tokenizer."""
        return {}

    def prompt_encoder(self, processor: ProcessorMixin, config: PretrainedConfig, max_length: int) -> PromptEncoding:
        """The encoder of prompts and targets of a prompted generator (VQA, captioning)."""
        raise NotImplementedError(f"{self.model_type} is not a prompted generator.")

    def vqa_head(self, context: VQAContext) -> VQAHead:
        """How the family answers questions; by default it generates them after the prompt
        (:class:`~ecoflap_pl.tasks.vqa_heads.GeneratedAnswers`)."""
        encoder = self.prompt_encoder(context.processor, context.config, context.max_length)
        return GeneratedAnswers(encoder, context.generator)

    def prefix_lm_captions(self, config: PretrainedConfig) -> bool:
        """Whether captioning trains with the prefix-LM split when the task leaves ``prefix_lm`` unset."""
        return False

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[int] | None:
        """End-of-text ids of generation; None: the model's own."""
        return None

    def echoed_prompt(self, config: PretrainedConfig, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """The ids ``generate`` repeats before the new tokens (cut off when present); None: it repeats nothing."""
        return prompt_ids

    def text_max_positions(self, config: PretrainedConfig) -> int:
        """The text position embeddings of the caption encoder (the longest caption it reads)."""
        return int(config.text_config.max_position_embeddings)
