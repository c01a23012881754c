"""Prompts and targets of the prompted generators that take the tokenizer's text as is (BLIP-2, BLIP).

Batch layout of every prompted generator (every tensor is ``(B, ...)``), shared with
:class:`~ecoflap_pl.tasks.processor_prompt_encoder.ProcessorPromptEncoder`:

- loss inputs, named as the Hugging Face ``forward`` arguments: ``pixel_values``, ``input_ids``,
  ``attention_mask``, ``labels`` (``-100`` where no loss is taken: image tokens, prompt, padding);
- generation inputs: ``pixel_values``, ``prompt_input_ids``, ``prompt_attention_mask`` (the prompt alone, left
  padded for a decoder-only language model so that every row continues right after its last token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import ProcessorMixin

from ecoflap_pl.tasks.labels import IGNORE_INDEX, shared_prefix_length


class PromptEncoding(Protocol):
    """Encodes images, prompts and targets of a prompted generator into loss and generation batches."""

    def loss_batch(self, samples: Any, prompts: Any, targets: Any) -> dict[str, Any]:
        """Image inputs, ``input_ids``, ``attention_mask`` and ``labels`` for the LM loss of ``targets``."""
        ...

    def prompt_batch(self, samples: Any, prompts: Any) -> dict[str, Any]:
        """Image inputs and the ``prompt_``-prefixed text inputs to generate from."""
        ...


class PromptEncoder:
    """Encodes images, prompts and targets with the model's image processor and tokenizer.

    - A decoder-only language model (BLIP-2 OPT, BLIP's text decoder): the tokenised ``prompt + target +
      target_suffix`` (LAVIS ends OPT targets with a newline); labels are the ids with the image tokens, the prompt
      and the padding at ``-100``.
    - An encoder-decoder one (BLIP-2 FlanT5): the stripped prompt goes to the encoder, the tokenised stripped target
      is the labels (padding ``-100``); the model shifts them right into the decoder inputs.
    - ``num_query_tokens`` image placeholder tokens are put first (as ``Blip2Processor`` puts them); with
      ``decoder_bos_token_id`` the text's first token is replaced by the decoder's BOS (BLIP's ``[DEC]``).

    The prompt's extent is the longest common prefix of its own encoding and the encoding of the whole text, so a
    tokenizer that merges across the boundary masks one token less instead of one token too many.

    Args:
        processor: the model's processor (its ``image_processor`` and ``tokenizer`` are used).
        max_length: text tokens kept per sequence (image tokens not counted).
        encoder_decoder: the language model is an encoder-decoder.
        target_suffix: text appended to every target of a decoder-only model.
        prompt_padding_side: padding side of generation prompts (``"left"`` for a decoder-only model that
            continues the prompt).
        num_query_tokens: image tokens per sequence (BLIP-2's queries; 0: none).
        image_token_id: id of the image placeholder token, required with ``num_query_tokens``.
        decoder_bos_token_id: the decoder start token that replaces the first text token (BLIP); None: none.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        max_length: int,
        encoder_decoder: bool = False,
        target_suffix: str = "",
        prompt_padding_side: str = "right",
        num_query_tokens: int = 0,
        image_token_id: int | None = None,
        decoder_bos_token_id: int | None = None,
    ) -> None:
        if num_query_tokens > 0 and image_token_id is None:
            raise ValueError(
                f"`image_token_id` must be set with `num_query_tokens` {num_query_tokens!r}, got None. HINT: take "
                "it from the model config."
            )
        self.image_processor: Any = processor.image_processor
        self.tokenizer: Any = processor.tokenizer
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.target_suffix = target_suffix
        self.prompt_padding_side = prompt_padding_side
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
    ) -> dict[str, Any]:
        """``pixel_values`` and :meth:`loss_inputs` (the interface of the processor-encoded families' encoder)."""
        return {"pixel_values": self.pixel_values(samples), **self.loss_inputs(prompts, targets)}

    def prompt_batch(self, samples: Sequence[dict[str, Any]], prompts: Sequence[str]) -> dict[str, Any]:
        """``pixel_values`` and :meth:`prompt_inputs`."""
        return {"pixel_values": self.pixel_values(samples), **self.prompt_inputs(prompts)}

    def loss_inputs(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` for the LM loss of ``targets`` given ``prompts``.

        ``prompts`` and ``targets`` are concatenated as given (put a separating space in the prompt); with an
        encoder-decoder they are stripped and fed to the encoder and the decoder.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"`targets` must hold one text per prompt ({len(prompts)}), got {len(targets)}.")
        if self.encoder_decoder:
            ids, mask = self._tokenize([prompt.strip() for prompt in prompts], "right")
            target_ids, target_mask = self._tokenize([target.strip() for target in targets], "right")
            labels = target_ids.masked_fill(target_mask == 0, IGNORE_INDEX)
            ids, mask, _ = self._with_image_tokens(ids, mask)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        texts = [prompt + target + self.target_suffix for prompt, target in zip(prompts, targets, strict=True)]
        ids, mask = self._tokenize(texts, "right")
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        prompt_ids = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length)["input_ids"]
        for row, prompt_row in enumerate(prompt_ids):
            labels[row, : shared_prefix_length(prompt_row, ids[row].tolist())] = IGNORE_INDEX
        if self.decoder_bos_token_id is not None:
            ids[:, 0] = self.decoder_bos_token_id
        ids, mask, with_labels = self._with_image_tokens(ids, mask, labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels if with_labels is None else with_labels}

    def prompt_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_input_ids`` and ``prompt_attention_mask`` to generate from."""
        texts = [prompt.strip() if self.encoder_decoder else prompt for prompt in prompts]
        ids, mask = self._tokenize(texts, self.prompt_padding_side)
        if self.decoder_bos_token_id is not None:
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
        if self.num_query_tokens == 0 or self.image_token_id is None:
            return ids, mask, labels
        shape = (ids.shape[0], self.num_query_tokens)
        ids = torch.cat([torch.full(shape, self.image_token_id, dtype=ids.dtype), ids], dim=1)
        mask = torch.cat([torch.ones(shape, dtype=mask.dtype), mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full(shape, IGNORE_INDEX, dtype=labels.dtype), labels], dim=1)
        return ids, mask, labels
