"""NLVR2: does a sentence hold for a pair of images? ViLT with two images, fine-tuned with cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import ProcessorMixin
from typing_extensions import override

from ecoflap_pl.metrics import MeanLoss, TopKAccuracy
from ecoflap_pl.models.loading import build_hf_model, check_tokenizer_source, expand_home
from ecoflap_pl.tasks.base import EcoflapTask
from ecoflap_pl.tasks.families import family_for
from ecoflap_pl.tasks.model_config import load_config

NUM_IMAGES = 2
"""Images per NLVR2 sample: left and right."""


class NLVR2Collator:
    """Turns NLVR2 sample dicts into a ViLT batch.

    Samples are ``{"images": [left, right], "identifier", "sentence", "label"}``. The batch holds ``input_ids``,
    ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) of the sentences, ``pixel_values``
    ``(B, 2, C, H, W)`` and ``pixel_mask`` ``(B, 2, H, W)`` (images padded to the largest in the batch),
    ``labels`` ``(B,)`` when every sample has one, and the ``identifier`` list.

    Args:
        processor: a ``ViltProcessor`` (image processor and tokenizer).
        max_length: sentences are truncated to this many tokens (ViLT's text position embeddings).
    """

    def __init__(self, processor: ProcessorMixin, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        for sample in samples:
            if len(sample["images"]) != NUM_IMAGES:
                raise ValueError(
                    f"`images` of NLVR2 sample {sample.get('identifier')!r} must hold {NUM_IMAGES} images (left, "
                    f"right), got {len(sample['images'])}."
                )
        images = [image for sample in samples for image in sample["images"]]
        pixels = self.processor.image_processor(images, return_tensors="pt")
        text = self.processor.tokenizer(
            [sample["sentence"] for sample in samples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch: dict[str, Any] = dict(text)
        pixel_values = pixels["pixel_values"]
        batch["pixel_values"] = pixel_values.view(len(samples), NUM_IMAGES, *pixel_values.shape[1:])
        pixel_mask = pixels.get("pixel_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.long)
        batch["pixel_mask"] = pixel_mask.view(len(samples), NUM_IMAGES, *pixel_mask.shape[1:])
        if all(sample.get("label") is not None for sample in samples):
            batch["labels"] = torch.tensor([int(sample["label"]) for sample in samples], dtype=torch.long)
        batch["identifier"] = [sample.get("identifier") for sample in samples]
        return batch


class NLVR2Task(EcoflapTask):
    """ViLT (``ViltForImagesAndTextClassification``, two images) on NLVR2.

    Loss: the model's own cross-entropy over {False, True}; metric: accuracy (:class:`~ecoflap_pl.metrics.TopKAccuracy`
    with ``top_k=1``; a repeated ``identifier`` counts once, so DDP's padding repeats drop out), logged as
    ``val/accuracy`` and ``test/accuracy``, with the same cross-entropy per sample as ``val/loss`` / ``test/loss``
    (:class:`~ecoflap_pl.metrics.MeanLoss`, each ``identifier`` once). ``predict_step`` returns ``{"identifier",
    "prediction" (bool), "probability"}`` per sample.

    Args:
        pretrained: a ``from_pretrained`` name or directory, e.g. ``dandelin/vilt-b32-finetuned-nlvr2``; its
            processor is loaded with ``AutoProcessor``.
        model_config: a ``ViltConfig`` as a dict (``num_images`` 2), for a randomly initialised model.
        tokenizer: a tokenizer directory; required with ``model_config`` (the image processor is then a
            ``ViltImageProcessor`` at the config's ``image_size``, sizes rounded to its ``patch_size``), optional
            with ``pretrained`` (replaces the processor's tokenizer).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        pretrained, tokenizer = expand_home(pretrained), expand_home(tokenizer)
        check_tokenizer_source(model_config, tokenizer)
        config = load_config(pretrained, model_config, "vilt", example="dandelin/vilt-b32-finetuned-nlvr2")
        self.family_adapter = family_for(config.model_type, "nlvr2")
        self.model = build_hf_model(self.family_adapter.model_classes["nlvr2"], pretrained, model_config)
        if self.model.config.num_images != NUM_IMAGES:
            raise ValueError(
                f"The ViLT config's `num_images` must be {NUM_IMAGES} for NLVR2, got {self.model.config.num_images!r}."
                " HINT: use an NLVR2 checkpoint (dandelin/vilt-b32-finetuned-nlvr2) or set num_images: 2."
            )
        self.processor = self.family_adapter.build_processor(self.model.config, pretrained, tokenizer)
        self.collator = NLVR2Collator(self.processor, max_length=self.model.config.max_position_embeddings)
        self.val_accuracy = TopKAccuracy(top_k=1)
        self.test_accuracy = TopKAccuracy(top_k=1)
        self.val_loss = MeanLoss()
        self.test_loss = MeanLoss()

    @override
    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**_model_inputs(batch))

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the two-image classifier against the NLVR2 labels."""
        if "labels" not in batch:
            raise ValueError("NLVR2 calibration and training batches must carry `labels`, got none.")
        return self(batch).loss

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, self.val_loss, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, self.test_loss, "test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        probabilities = self(batch).logits.softmax(dim=-1)
        return [
            {"identifier": identifier, "prediction": bool(p.argmax() == 1), "probability": float(p[1])}
            for identifier, p in zip(batch["identifier"], probabilities.float().cpu(), strict=True)
        ]

    def _evaluate(self, batch: dict[str, Any], metric: TopKAccuracy, loss: MeanLoss, prefix: str) -> None:
        if "labels" not in batch:
            raise ValueError(f"NLVR2 {prefix} batches must carry `labels` (the sample's `label`), got none.")
        output = self(batch)
        batch_size = len(batch["identifier"])
        # per sample, the cross-entropy the model's `loss` averages over the batch
        loss.update(F.cross_entropy(output.logits.float(), batch["labels"], reduction="none"), ids=batch["identifier"])
        self.log(f"{prefix}/loss", loss, batch_size=batch_size)
        metric.update(output.logits, batch["labels"], ids=batch["identifier"])
        self.log(f"{prefix}/accuracy", metric, batch_size=batch_size, prog_bar=True)


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask", "labels")
    return {key: batch[key] for key in keys if key in batch}
