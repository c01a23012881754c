"""Prompts, targets and images encoded by a model's own processor, for the families of
:data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES` (LLaVA, Qwen-VL, InstructBLIP, PaliGemma).

These processors expand the image into its tokens themselves (a number that can depend on the image's size), so
the text and the image of a sample are always encoded together. Batch layout, as the BLIP-2 encoder's:

- loss inputs under the Hugging Face ``forward`` names (``input_ids``, ``attention_mask``, ``labels`` with ``-100``
  on the prompt, the image tokens and the padding, and what else the processor returns: ``pixel_values``,
  ``image_grid_thw``, ``token_type_ids``, ``qformer_input_ids``, ...);
- generation inputs: the image inputs unprefixed and the prompt's text inputs prefixed ``prompt_``
  (``prompt_input_ids``, ``prompt_attention_mask``, ...), left padded for a decoder-only language model.

The families that take the tokenizer's text as is (BLIP-2, BLIP) use
:class:`~ecoflap_pl.tasks.prompt_encoder.PromptEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PretrainedConfig, ProcessorMixin

from ecoflap_pl.models.families import GenerativeFamily
from ecoflap_pl.tasks.labels import IGNORE_INDEX, shared_prefix_length

TEXT_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "qformer_input_ids",
    "qformer_attention_mask",
)
"""Processor outputs that belong to the text (prefixed ``prompt_`` in generation inputs); the rest are image inputs."""


class ProcessorPromptEncoder:
    """Encodes images, prompts and targets of one :class:`GenerativeFamily` with the model's processor.

    - Decoder-only language models (LLaVA, Qwen-VL, InstructBLIP with Vicuna/OPT): the text is the prompt (through
      the chat template for chat families), a space (not after a chat turn), the target and the tokenizer's EOS;
      labels mask the longest common prefix of this encoding and the prompt's own encoding.
    - Encoder-decoder (InstructBLIP FlanT5): the prompt goes to the encoder, the tokenised target (EOS appended by
      the tokenizer) is the labels.
    - PaliGemma: the processor builds ``labels`` and ``token_type_ids`` from ``suffix=`` (prefix ``\\n`` and EOS
      its own way).

    InstructBLIP's Q-Former always reads the prompt alone (the instruction), never the target.

    Args:
        processor: the model's processor.
        family: the model's family.
        config: the model's config (decides encoder-decoder).
        max_length: target tokens scored per sample; later ones are masked out of the loss.
    """

    def __init__(
        self, processor: ProcessorMixin, family: GenerativeFamily, config: PretrainedConfig, max_length: int
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.encoder_decoder = family.encoder_decoder(config)
        self.max_length = max_length

    def text(self, prompt: str) -> str:
        """The processor's text for ``prompt``: the prompt itself, or its chat-template user turn with the image."""
        prompt = prompt.strip()
        if not self.family.chat:
            return prompt
        message: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return self.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)

    def _encode(self, samples: Sequence[dict[str, Any]], texts: list[str], side: str, **kwargs: Any) -> dict:
        encoded = self.processor(
            images=[sample["image"] for sample in samples],
            text=texts,
            padding="longest",
            padding_side=side,
            return_tensors="pt",
            **kwargs,
        )
        return dict(encoded)

    def loss_batch(
        self, samples: Sequence[dict[str, Any]], prompts: Sequence[str], targets: Sequence[str]
    ) -> dict[str, Any]:
        """Image inputs, ``input_ids``, ``attention_mask`` and ``labels`` for the LM loss of ``targets``."""
        if len(prompts) != len(targets) or len(prompts) != len(samples):
            raise ValueError(
                f"`prompts` and `targets` must hold one text per sample ({len(samples)}), got {len(prompts)} and "
                f"{len(targets)}."
            )
        texts = [self.text(prompt) for prompt in prompts]
        targets = [target.strip() for target in targets]
        if self.family.labels_from_suffix:
            batch = self._encode(samples, texts, "right", suffix=targets)
            batch["labels"] = self._truncate(batch["labels"])
            return batch
        prompt_batch = self._encode(samples, texts, "right")
        if self.encoder_decoder:
            labels = self.tokenizer(targets, padding="longest", return_tensors="pt")
            prompt_batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, IGNORE_INDEX)
            prompt_batch["labels"] = self._truncate(prompt_batch["labels"])
            return prompt_batch
        joiner = "" if self.family.chat else " "
        eos = self.tokenizer.eos_token or ""
        full = [text + joiner + target + eos for text, target in zip(texts, targets, strict=True)]
        batch = self._encode(samples, full, "right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        for row in range(len(samples)):
            prompt_ids = prompt_batch["input_ids"][row][prompt_batch["attention_mask"][row] == 1].tolist()
            labels[row, : shared_prefix_length(prompt_ids, batch["input_ids"][row].tolist())] = IGNORE_INDEX
        batch["labels"] = self._truncate(labels)
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            if key in prompt_batch:
                batch[key] = prompt_batch[key]
        return batch

    def _truncate(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with every target token after the first ``max_length`` of its row masked out."""
        scored = labels != IGNORE_INDEX
        return labels.masked_fill(scored.long().cumsum(dim=1) > self.max_length, IGNORE_INDEX)

    def prompt_batch(self, samples: Sequence[dict[str, Any]], prompts: Sequence[str]) -> dict[str, Any]:
        """Image inputs and the ``prompt_``-prefixed text inputs to generate from."""
        side = "right" if self.encoder_decoder else "left"
        encoded = self._encode(samples, [self.text(prompt) for prompt in prompts], side)
        encoded.pop("labels", None)  # PaliGemma's processor marks a prompt without suffix as all-ignored labels
        return {(f"prompt_{key}" if key in TEXT_INPUT_KEYS else key): value for key, value in encoded.items()}
