"""Models, processors and text encodings shared by the vision-language tasks (captioning, VQA, ...).

A task names its model by ``pretrained`` (a ``from_pretrained`` name or a local directory: the real path, whose
processor comes from ``AutoProcessor``) or by ``model_config`` (a config dict: a random-initialised model, for tests
and the demo, with a ``tokenizer`` directory and an image processor built from the config). The helpers here
resolve the architecture from the config's ``model_type``, build the processor, and encode prompts and targets for
the prompted generators: BLIP-2 with a decoder-only language model (OPT), BLIP-2 with an encoder-decoder one
(FlanT5), and BLIP's image-grounded text decoder. The families of
:data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES` (LLaVA, Qwen-VL, InstructBLIP, PaliGemma) are encoded by
their own processor (:mod:`ecoflap_pl.tasks._processor_prompts`) into the same layout.

Batch layout of the prompted generators (every tensor is ``(B, ...)``):

- loss inputs, named as the Hugging Face ``forward`` arguments: ``pixel_values``, ``input_ids``,
  ``attention_mask``, ``labels`` (``-100`` where no loss is taken: image tokens, prompt, padding);
- generation inputs: ``pixel_values``, ``prompt_input_ids``, ``prompt_attention_mask`` (the prompt alone, left
  padded for a decoder-only language model so that every row continues right after its last token).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoProcessor,
    Blip2Processor,
    BlipImageProcessor,
    BlipProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    ViltImageProcessor,
    ViltProcessor,
)

from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.models.loading import check_model_source, check_tokenizer_source, hub_load_errors, load_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value the Hugging Face losses skip."""

ARCHITECTURES = {"blip-2": "blip2", "blip": "blip", "vilt": "vilt", **{name: name for name in GENERATIVE_FAMILIES}}
"""Hugging Face ``model_type`` -> the ``architecture`` name the tasks take (a generative family's is its own)."""

FAMILIES = ("blip2_opt", "blip2_t5", "blip")
"""Prompted generators: BLIP-2 with a decoder-only language model, BLIP-2 with an encoder-decoder one, BLIP."""

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
"""Image inputs :func:`generate_texts` passes to ``generate`` beside the ``prompt_*`` text inputs."""


def load_config(
    pretrained: str | None, model_config: dict[str, Any] | PretrainedConfig | None, architecture: str | None = None
) -> PretrainedConfig:
    """The config of the model a task builds.

    Args:
        pretrained: a hub name or a local ``save_pretrained`` directory; its config is read with ``AutoConfig``.
        model_config: a config dict (``to_dict()`` of a config, with its ``model_type``) or a config object.
        architecture: used to pick the config class when ``model_config`` has no ``model_type``.

    Raises:
        ValueError: not exactly one of ``pretrained`` and ``model_config``, or a dict whose type is unknown.
    """
    check_model_source(pretrained, model_config)
    if pretrained is not None:
        with hub_load_errors(pretrained):
            return AutoConfig.from_pretrained(pretrained)
    if isinstance(model_config, PretrainedConfig):
        return model_config
    if not isinstance(model_config, dict):
        raise TypeError(f"`model_config` must be a dict, got {type(model_config).__name__}.")
    model_type = model_config.get("model_type") or {v: k for k, v in ARCHITECTURES.items()}.get(architecture or "")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"`model_config` must name its `model_type` (one of {sorted(ARCHITECTURES)}), got "
            f"{model_config.get('model_type')!r}. HINT: pass a config's to_dict(), or set `architecture`."
        )
    return CONFIG_MAPPING[model_type].from_dict(model_config)


def resolve_architecture(architecture: str | None, config: PretrainedConfig, allowed: Sequence[str]) -> str:
    """``architecture`` if given (checked against the config), else the one the config's ``model_type`` names."""
    inferred = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        if inferred not in allowed:
            raise ValueError(
                f"`architecture` could not be inferred from the model's model_type {config.model_type!r}: it must "
                f"be one of {tuple(allowed)}. HINT: use a checkpoint of a supported architecture."
            )
        return inferred
    if architecture not in allowed:
        raise ValueError(f"`architecture` must be one of {tuple(allowed)}, got {architecture!r}.")
    if inferred != architecture:
        raise ValueError(
            f"`architecture` is {architecture!r} but the model's model_type is {config.model_type!r}. HINT: leave "
            "`architecture` unset to infer it, or give a model of that architecture."
        )
    return architecture


def family_of(architecture: str, config: PretrainedConfig) -> str:
    """The prompted-generator family of a config: one of :data:`FAMILIES` for BLIP-2 and BLIP, else the
    architecture itself (a :data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES` key)."""
    if architecture in GENERATIVE_FAMILIES:
        return architecture
    if architecture == "blip2":
        return "blip2_opt" if config.use_decoder_only_language_model else "blip2_t5"
    if architecture == "blip":
        return "blip"
    raise ValueError(
        f"`architecture` {architecture!r} is not a prompted generator; one of "
        f"{('blip2', 'blip', *GENERATIVE_FAMILIES)}."
    )


def text_vocab_size(config: PretrainedConfig) -> int:
    """Size of the text vocabulary the model embeds."""
    text_config = getattr(config, "text_config", None)
    return int((text_config if text_config is not None else config).vocab_size)


def build_processor(
    architecture: str, config: PretrainedConfig, pretrained: str | None, tokenizer: str | None
) -> ProcessorMixin:
    """The processor (image processor + tokenizer) of the model.

    With ``pretrained``: the image processor (and tokenizer unless ``tokenizer`` is given) of
    ``AutoProcessor.from_pretrained(pretrained)``. With a config only: ``tokenizer`` is required; the image
    processor resizes to the config's image size with the architecture's normalisation (BLIP/BLIP-2: CLIP mean and
    std; ViLT: shortest edge = image size, sides rounded down to the patch size, mean = std = 0.5).
    A BLIP-2 processor gets the config's ``num_query_tokens``. A generative family's processor is its own
    (``AutoProcessor``), or the family's offline processor around ``tokenizer`` for a config-only model.

    Raises:
        ValueError: no tokenizer with a config-built model, or a tokenizer larger than the model's vocabulary.
    """
    if architecture in GENERATIVE_FAMILIES:
        return _generative_processor(architecture, config, pretrained, tokenizer)
    custom_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
    if pretrained is not None:
        loaded = AutoProcessor.from_pretrained(pretrained)
        image_processor = getattr(loaded, "image_processor", None)
        text_tokenizer = custom_tokenizer or getattr(loaded, "tokenizer", None)
        if image_processor is None or text_tokenizer is None:
            raise ValueError(
                f"`pretrained` {pretrained!r} must hold a processor with an image processor and a tokenizer, got "
                f"{type(loaded).__name__}. HINT: save the processor next to the model with "
                "processor.save_pretrained(dir)."
            )
    else:
        check_tokenizer_source(config, tokenizer)
        image_processor = _image_processor(architecture, config)
        text_tokenizer = custom_tokenizer
    if custom_tokenizer is not None and len(custom_tokenizer) > text_vocab_size(config):
        raise ValueError(
            f"`tokenizer` has {len(custom_tokenizer)} tokens, more than the model's text vocabulary "
            f"({text_vocab_size(config)}). HINT: build the model config with vocab_size >= len(tokenizer)."
        )
    if architecture == "blip2":
        return Blip2Processor(image_processor, text_tokenizer, num_query_tokens=config.num_query_tokens)
    if architecture == "blip":
        return BlipProcessor(image_processor, text_tokenizer)
    return ViltProcessor(image_processor, text_tokenizer)


def _generative_processor(
    architecture: str, config: PretrainedConfig, pretrained: str | None, tokenizer: str | None
) -> ProcessorMixin:
    if pretrained is not None:
        if tokenizer is not None:
            raise ValueError(
                f"`tokenizer` must be None for a pretrained {architecture} model, got {tokenizer!r}: its processor "
                "expands image tokens with its own tokenizer. HINT: save a processor with the tokenizer you want "
                "(processor.save_pretrained(dir)) and pass that directory as `pretrained`."
            )
        processor = AutoProcessor.from_pretrained(pretrained)
    else:
        check_tokenizer_source(config, tokenizer)
        processor = GENERATIVE_FAMILIES[architecture].offline_processor(config, load_tokenizer(str(tokenizer)))
    if len(processor.tokenizer) > text_vocab_size(config):
        raise ValueError(
            f"The {architecture} processor's tokenizer has {len(processor.tokenizer)} tokens, more than the model's "
            f"text vocabulary ({text_vocab_size(config)}). HINT: build the model config with vocab_size >= "
            "len(processor.tokenizer) (PaliGemma's processor adds 1152 location and segmentation tokens)."
        )
    return processor


def _image_processor(architecture: str, config: PretrainedConfig) -> Any:
    if architecture == "vilt":
        return ViltImageProcessor(size={"shortest_edge": config.image_size}, size_divisor=config.patch_size)
    size = config.vision_config.image_size
    return BlipImageProcessor(size={"height": size, "width": size})


def loss_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` that the model's ``forward`` takes (:data:`LOSS_INPUT_KEYS`)."""
    return {key: batch[key] for key in LOSS_INPUT_KEYS if key in batch}


def prefix_split(text: str, seed: int = 0) -> tuple[str, str]:
    """Split ``text`` for the prefix-LM loss at a character position drawn from ``[1, max(1, len(text) // 2)]``.

    The position comes from a generator seeded by a stable hash of ``seed`` and the text, so the same caption is
    always split the same way (calibration is reproducible) while different captions get different splits.

    Returns:
        ``(prefix, rest)`` with ``prefix + rest == text``.
    """
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    cut = random.Random(int.from_bytes(digest[:8], "big")).randint(1, max(1, len(text) // 2))
    return text[:cut], text[cut:]


def shared_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Number of leading ids two sequences have in common."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def stop_token_ids(family: str, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[int] | None:
    """End-of-text ids of a decoder-only BLIP-2: the model's EOS and, as LAVIS, the newline token if it is one."""
    if family != "blip2_opt":
        return None
    ids = [int(config.text_config.eos_token_id)]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) == 1 and newline[0] not in ids:
        ids.append(int(newline[0]))
    return ids


def search_kwargs(num_beams: int, length_penalty: float) -> dict[str, Any]:
    """``generate``'s search arguments: ``length_penalty`` scores beams only, so it goes with ``num_beams > 1`` alone
    (given to greedy search, transformers warns that it is ignored)."""
    return {"num_beams": num_beams, **({"length_penalty": length_penalty} if num_beams > 1 else {})}


def check_image_placeholder(architecture: str, prompt: str) -> None:
    """A family whose prompt marks the image (LLaVA's ``<image>``) must have the mark in ``prompt``."""
    family = GENERATIVE_FAMILIES.get(architecture)
    placeholder = family.image_placeholder if family is not None else None
    if placeholder is not None and prompt.count(placeholder) != 1:
        raise ValueError(
            f"`prompt` must hold {placeholder!r} once, where {architecture} puts the image, got {prompt!r}. HINT: "
            f"e.g. {family.vqa_prompt!r}."  # type: ignore[union-attr]
        )


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


class PromptEncoder:
    """Encodes images, prompts and targets for a prompted generator (one of :data:`FAMILIES`).

    - ``blip2_opt``: ``<image> x num_query_tokens`` (as ``Blip2Processor`` puts them), then the tokenised
      ``prompt + target + "\\n"`` (LAVIS ends OPT targets with a newline); labels are the ids with the image
      tokens, the prompt and the padding at ``-100``. Generation prompts are left padded.
    - ``blip2_t5``: encoder ``<image> x n`` + prompt, labels = the tokenised target (padding ``-100``); the model
      shifts them right into the decoder inputs.
    - ``blip``: ``prompt + target`` with its first token replaced by the decoder's BOS (BLIP's ``[DEC]``); labels
      mask the prompt and the padding.

    The prompt's extent is the longest common prefix of its own encoding and the encoding of the whole text, so a
    tokenizer that merges across the boundary masks one token less instead of one token too many.

    Args:
        processor: the model's processor (its ``image_processor`` and ``tokenizer`` are used).
        family: one of :data:`FAMILIES`.
        max_length: text tokens kept per sequence (image tokens not counted).
        num_query_tokens: BLIP-2 image tokens per sequence.
        image_token_id: id of BLIP-2's image placeholder token.
        decoder_bos_token_id: BLIP's decoder start token.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        family: str,
        max_length: int,
        num_query_tokens: int = 0,
        image_token_id: int | None = None,
        decoder_bos_token_id: int | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
        if family.startswith("blip2") and (image_token_id is None or num_query_tokens < 1):
            raise ValueError(
                f"BLIP-2 needs `image_token_id` and `num_query_tokens` >= 1, got {image_token_id!r} and "
                f"{num_query_tokens!r}. HINT: take them from the model config."
            )
        if family == "blip" and decoder_bos_token_id is None:
            raise ValueError("BLIP needs `decoder_bos_token_id` (text_config.bos_token_id), got None.")
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.max_length = max_length
        self.num_query_tokens = num_query_tokens
        self.image_token_id = image_token_id
        self.decoder_bos_token_id = decoder_bos_token_id

    def pixel_values(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels of the samples' PIL ``"image"``, or their ``"pixel_values"`` when every sample
        carries its image already processed by this processor (``(3, H, W)``; the demo's training caches them)."""
        if all("pixel_values" in sample for sample in samples):
            return torch.stack([sample["pixel_values"] for sample in samples])
        return self.image_processor([sample["image"] for sample in samples], return_tensors="pt")["pixel_values"]

    def loss_batch(
        self, samples: Sequence[dict[str, Any]], prompts: Sequence[str], targets: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` and :meth:`loss_inputs` (the interface of the processor-encoded families' encoder)."""
        return {"pixel_values": self.pixel_values(samples), **self.loss_inputs(prompts, targets)}

    def prompt_batch(self, samples: Sequence[dict[str, Any]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pixel_values`` and :meth:`prompt_inputs`."""
        return {"pixel_values": self.pixel_values(samples), **self.prompt_inputs(prompts)}

    def loss_inputs(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` for the LM loss of ``targets`` given ``prompts``.

        ``prompts`` and ``targets`` are concatenated as given (put a separating space in the prompt); with
        ``blip2_t5`` they are stripped and fed to the encoder and the decoder.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"`targets` must hold one text per prompt ({len(prompts)}), got {len(targets)}.")
        if self.family == "blip2_t5":
            ids, mask = self._tokenize([prompt.strip() for prompt in prompts], "right")
            target_ids, target_mask = self._tokenize([target.strip() for target in targets], "right")
            labels = target_ids.masked_fill(target_mask == 0, IGNORE_INDEX)
            ids, mask, _ = self._with_image_tokens(ids, mask)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        suffix = "\n" if self.family == "blip2_opt" else ""
        ids, mask = self._tokenize(
            [prompt + target + suffix for prompt, target in zip(prompts, targets, strict=True)], "right"
        )
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        prompt_ids = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length)["input_ids"]
        for row, prompt_row in enumerate(prompt_ids):
            labels[row, : shared_prefix_length(prompt_row, ids[row].tolist())] = IGNORE_INDEX
        if self.family == "blip":
            ids[:, 0] = self.decoder_bos_token_id
        ids, mask, labels = self._with_image_tokens(ids, mask, labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def prompt_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_input_ids`` and ``prompt_attention_mask`` to generate from (left padded for ``blip2_opt``)."""
        side = "left" if self.family == "blip2_opt" else "right"
        ids, mask = self._tokenize([p.strip() if self.family == "blip2_t5" else p for p in prompts], side)
        if self.family == "blip":
            ids[:, 0] = self.decoder_bos_token_id
        ids, mask, _ = self._with_image_tokens(ids, mask)
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask}

    def _tokenize(self, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side=side,
            return_tensors="pt",
        )
        return encoded["input_ids"], encoded["attention_mask"]

    def _with_image_tokens(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.family.startswith("blip2"):
            return ids, mask, labels
        shape = (ids.shape[0], self.num_query_tokens)
        ids = torch.cat([torch.full(shape, self.image_token_id, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.ones(shape, dtype=mask.dtype), mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full(shape, IGNORE_INDEX, dtype=labels.dtype), labels], dim=1)
        return ids, mask, labels


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, Any],
    **generation_kwargs: Any,
) -> list[str]:
    """Generate from the image inputs and the batch's ``prompt_*`` inputs; returns the new text of each row, stripped.

    Decoder-only language models return the prompt followed by the new tokens: the prompt part is cut off.
    """
    prompt_ids = batch["prompt_input_ids"]
    inputs = {key.removeprefix("prompt_"): value for key, value in batch.items() if key.startswith("prompt_")}
    inputs.update({key: batch[key] for key in GENERATION_IMAGE_KEYS if key in batch})
    output = model.generate(**{**inputs, "input_ids": prompt_ids.clone()}, **generation_kwargs)
    # BLIP drops the prompt's [SEP]; an encoder-decoder's output starts with its decoder start token instead
    echoed = prompt_ids[:, :-1] if family == "blip" else None if family == "blip2_t5" else prompt_ids
    if echoed is not None:
        length = echoed.shape[1]
        if output.shape[1] >= length and torch.equal(output[:, :length], echoed.to(output.device)):
            output = output[:, length:]
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
