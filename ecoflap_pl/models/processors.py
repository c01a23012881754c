"""Processors of config-only models (tests, the demo): an offline tokenizer plus an image processor sized from the
config. Real runs load the processor that ships with a ``from_pretrained`` model instead.
"""

from __future__ import annotations

from transformers import (
    BlipImageProcessor,
    CLIPImageProcessor,
    InstructBlipProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipImageProcessor,
    ViltImageProcessor,
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The shape of Qwen-VL's chat template (user turn with the image first), for offline tokenizers that have none."""


def llava_processor(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """CLIP image processor at the vision tower's size; one image token per patch (the CLS token is dropped)."""
    vision = config.vision_config
    return LlavaProcessor(
        clip_image_processor(config),
        tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )


def qwen_vl_processor(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """Native-resolution patches (``patch_size``, merged ``spatial_merge_size``²) of images between 16 and 64
    merged patches, and the chat template's shape."""
    vision = config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    unit = (patch * merge) ** 2
    images = Qwen2VLImageProcessor(
        min_pixels=4 * unit, max_pixels=16 * unit, patch_size=patch, merge_size=merge, temporal_patch_size=temporal
    )
    videos = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    processor_cls: type[Qwen2VLProcessor | Qwen2_5_VLProcessor]
    processor_cls = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_cls(
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=QWEN_CHAT_TEMPLATE
    )


def instructblip_processor(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> InstructBlipProcessor:
    """BLIP image processor; the tokenizer serves the language model and the Q-Former's instruction input."""
    images = blip_image_processor(config)
    return InstructBlipProcessor(images, tokenizer, tokenizer, num_query_tokens=config.num_query_tokens)


def paligemma_processor(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> PaliGemmaProcessor:
    """SigLIP image processor; one image token per patch. The processor adds PaliGemma's location and
    segmentation tokens to the tokenizer."""
    vision = config.vision_config
    images = SiglipImageProcessor(size={"height": vision.image_size, "width": vision.image_size})
    # PaliGemmaProcessor reads image_seq_length from its image processor, which does not declare it
    setattr(images, "image_seq_length", (vision.image_size // vision.patch_size) ** 2)  # noqa: B010
    return PaliGemmaProcessor(images, tokenizer)


def blip_image_processor(config: PretrainedConfig) -> BlipImageProcessor:
    """BLIP's and BLIP-2's resize to the vision tower's size, CLIP's mean and std."""
    size = config.vision_config.image_size
    return BlipImageProcessor(size={"height": size, "width": size})


def clip_image_processor(config: PretrainedConfig) -> CLIPImageProcessor:
    """CLIP's resize of the shortest edge and center crop to the vision tower's size."""
    size = config.vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def vilt_image_processor(config: PretrainedConfig) -> ViltImageProcessor:
    """ViLT's resize of the shortest edge to the image size, sides rounded down to the patch size, mean = std = 0.5."""
    # type checkers see the backend base class of ViltImageProcessor, whose __init__ lacks ViLT's size_divisor
    return ViltImageProcessor(
        size={"shortest_edge": config.image_size},
        size_divisor=config.patch_size,  # type: ignore[call-arg]
    )


def siglip_image_processor(config: PretrainedConfig) -> SiglipImageProcessor:
    """SigLIP's resize to the vision tower's size, mean = std = 0.5."""
    size = config.vision_config.image_size
    return SiglipImageProcessor(size={"height": size, "width": size})
