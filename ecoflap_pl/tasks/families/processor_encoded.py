"""The prompted generators whose own processor expands the image tokens (LLaVA, Qwen2-VL, Qwen2.5-VL, InstructBLIP,
PaliGemma): one adapter serves every entry of :data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES`."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoProcessor, PretrainedConfig, ProcessorMixin
from typing_extensions import override

from ecoflap_pl.models.families import GenerativeFamily
from ecoflap_pl.models.loading import check_tokenizer_source, check_vocabulary, load_tokenizer
from ecoflap_pl.tasks.families.adapter import FamilyAdapter
from ecoflap_pl.tasks.processor_prompt_encoder import ProcessorPromptEncoder


@dataclass(frozen=True)
class ProcessorEncodedFamily(FamilyAdapter):
    """A family described by a :class:`~ecoflap_pl.models.families.GenerativeFamily`: its processor comes from
    ``AutoProcessor`` (or the family's offline builder for a config-only model) and encodes prompts, targets and
    images together (:class:`~ecoflap_pl.tasks.processor_prompt_encoder.ProcessorPromptEncoder`).

    Attributes:
        generative: the family's description.
    """

    generative: GenerativeFamily | None = None

    @classmethod
    def of(cls, family: GenerativeFamily) -> ProcessorEncodedFamily:
        """The adapter of ``family``: its class serves VQA and captioning with its own prompts."""
        return cls(
            family.name,
            family.name,
            {"vqa": family.model_class, "captioning": family.model_class},
            prompts={"vqa": family.vqa_prompt, "captioning": family.caption_prompt},
            image_placeholder=family.image_placeholder,
            generative=family,
        )

    @property
    def description(self) -> GenerativeFamily:
        """The family's :class:`~ecoflap_pl.models.families.GenerativeFamily`."""
        if self.generative is None:
            raise ValueError(f"{self.model_type}: a ProcessorEncodedFamily needs `generative`. HINT: use .of().")
        return self.generative

    @override
    def build_processor(
        self, config: PretrainedConfig, pretrained: str | None, tokenizer: str | None
    ) -> ProcessorMixin:
        """The model's own processor (``AutoProcessor``), or the family's offline processor around ``tokenizer``.

        Raises:
            ValueError: a ``tokenizer`` with a pretrained model (its processor expands image tokens with its own), or
                a processor whose tokenizer is larger than the model's vocabulary.
        """
        if pretrained is not None:
            if tokenizer is not None:
                raise ValueError(
                    f"`tokenizer` must be None for a pretrained {self.architecture} model, got {tokenizer!r}: its "
                    "processor expands image tokens with its own tokenizer. HINT: save a processor with the tokenizer "
                    "you want (processor.save_pretrained(dir)) and pass that directory as `pretrained`."
                )
            processor: ProcessorMixin = AutoProcessor.from_pretrained(pretrained)
        else:
            check_tokenizer_source(config, tokenizer)
            processor = self.description.offline_processor(config, load_tokenizer(str(tokenizer)))
        check_vocabulary(
            processor.tokenizer,
            config,
            f"The {self.architecture} processor's tokenizer",
            " (PaliGemma's processor adds 1152 location and segmentation tokens)",
        )
        return processor

    @override
    def prompt_encoder(
        self, processor: ProcessorMixin, config: PretrainedConfig, max_length: int
    ) -> ProcessorPromptEncoder:
        return ProcessorPromptEncoder(processor, self.description, config, max_length)
