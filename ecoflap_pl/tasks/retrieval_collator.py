"""The batch of image-text retrieval: images, their captions, and which image each caption describes."""

from __future__ import annotations

from typing import Any

import torch


class RetrievalCollator:
    """Turns caption samples into a retrieval batch.

    Training samples ``{"image", "image_id", "text"}`` give one caption per image; evaluation samples
    ``{"image", "image_id", "references": [captions]}`` give every caption of the image, each a text query whose
    ground truth is that image. The batch holds ``pixel_values`` ``(B, C, H, W)``, ``input_ids`` and
    ``attention_mask`` ``(T, L)`` of the ``T`` captions, ``text_to_image`` ``(T,)`` (index of each caption's image in
    the batch) and the ``image_id`` list (``None`` where a sample has none).

    Args:
        image_processor: the model's image processor (resize, crop, normalise).
        tokenizer: the model's tokenizer.
        max_length: captions are truncated to this many tokens.
        padding: ``"longest"``, or ``"max_length"`` for a text tower trained on fixed-length prompts (SigLIP).
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_length: int, padding: str = "longest") -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts: list[str] = []
        text_to_image: list[int] = []
        for index, sample in enumerate(samples):
            captions = sample["references"] if "references" in sample else [sample["text"]]
            if isinstance(captions, str) or not captions:
                raise ValueError(
                    f"`references` of image {sample.get('image_id')!r} must be a non-empty list of captions, got "
                    f"{captions!r}."
                )
            texts.extend(captions)
            text_to_image.extend([index] * len(captions))
        pixel_values = self.image_processor([sample["image"] for sample in samples], return_tensors="pt")
        tokens = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "pixel_values": pixel_values["pixel_values"],
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "text_to_image": torch.tensor(text_to_image, dtype=torch.long),
            "image_id": [sample.get("image_id") for sample in samples],
        }
