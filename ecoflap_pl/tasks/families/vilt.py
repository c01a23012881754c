"""ViLT (``model_type`` ``vilt``): VQA as answer classification, NLVR2 with two images."""

from __future__ import annotations

from typing import Any

from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltImageProcessor,
    ViltProcessor,
)
from typing_extensions import override

from ecoflap_pl.tasks.families.adapter import FamilyAdapter
from ecoflap_pl.tasks.vqa_heads import AnswerClassifier, Generator, VQAHead


class ViltFamily(FamilyAdapter):
    """ViLT: images resized to the shortest edge = image size, sides rounded down to the patch size, mean = std =
    0.5; VQA scores a fixed answer vocabulary."""

    @override
    def offline_image_processor(self, config: PretrainedConfig) -> Any:
        # type checkers see the backend base class of ViltImageProcessor, whose __init__ lacks ViLT's size_divisor
        return ViltImageProcessor(
            size={"shortest_edge": config.image_size},
            size_divisor=config.patch_size,  # type: ignore[call-arg]
        )

    @override
    def processor(
        self, image_processor: Any, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig
    ) -> ProcessorMixin:
        return ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)

    @override
    def vqa_head(
        self,
        processor: ProcessorMixin,
        config: PretrainedConfig,
        max_length: int,
        answer_list: list[str] | None,
        generator: Generator,
    ) -> VQAHead:
        return AnswerClassifier(processor, config, max_length, answer_list)


VILT = ViltFamily(
    "vilt",
    "vilt",
    {"vqa": ViltForQuestionAnswering, "nlvr2": ViltForImagesAndTextClassification},
    prompts={"vqa": "{}"},  # the bare question
)
