"""ViLT (``model_type`` ``vilt``): VQA as answer classification, NLVR2 with two images."""

from __future__ import annotations

from transformers import ViltForImagesAndTextClassification, ViltForQuestionAnswering, ViltProcessor
from typing_extensions import override

from ecoflap_pl.models.processors import vilt_image_processor
from ecoflap_pl.tasks.families.adapter import FamilyAdapter
from ecoflap_pl.tasks.vqa_heads import AnswerClassifier, VQAContext, VQAHead


class ViltFamily(FamilyAdapter):
    """ViLT: VQA scores a fixed answer vocabulary."""

    @override
    def vqa_head(self, context: VQAContext) -> VQAHead:
        return AnswerClassifier(context.processor, context.config, context.max_length, context.answer_list)


VILT = ViltFamily(
    "vilt",
    "vilt",
    {"vqa": ViltForQuestionAnswering, "nlvr2": ViltForImagesAndTextClassification},
    prompts={"vqa": "{}"},  # the bare question
    image_processor=vilt_image_processor,
    processor_class=ViltProcessor,
)
