"""What the image classifiers share (a timm classifier, CLIP / SigLIP zero-shot): the collator, the two-stage
preprocessing, the cross-entropy loss, top-1 / top-5 accuracy and predictions.

Images are preprocessed in two stages. The collator (the one ``collate_fn`` the DataModule gives every loader,
calibration included) applies timm's deterministic evaluation transform without normalisation and batches
``uint8`` pixels. The task then normalises them on the device and, in ``training_step`` only, first applies timm's
training augmentation (random resized crop, flip, colour jitter) image by image. Doing the augmentation in the
collator would need to know which loader it serves, which a collate function running in a DataLoader worker cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch import Tensor
from torchvision import transforms
from typing_extensions import override

from ecoflap_pl.metrics import MeanLoss, TopKAccuracy
from ecoflap_pl.tasks.base import EcoflapTask


class ClassificationCollator:
    """Turns ``{"image", "label", "image_id"}`` samples into ``{"pixel_values": uint8 (B, C, H, W), "labels": (B,),
    "image_id": [B]}`` (``labels`` when every sample has one; ``image_id`` None for a sample without one).

    Args:
        transform: PIL image -> ``uint8`` tensor ``(C, H, W)``: timm's evaluation transform with
            ``normalize=False`` (resize, center crop).
    """

    def __init__(self, transform: Callable[[Any], Tensor]) -> None:
        self.transform = transform

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"pixel_values": torch.stack([self.transform(s["image"]) for s in samples])}
        if all(sample.get("label") is not None for sample in samples):
            batch["labels"] = torch.tensor([int(sample["label"]) for sample in samples], dtype=torch.long)
        batch["image_id"] = [sample.get("image_id") for sample in samples]
        return batch


class ImageClassificationTask(EcoflapTask):
    """Base of the image classifiers: subclasses build ``self.model``, call :meth:`_set_preprocessing` with timm's
    data config and :meth:`_build_metrics` with the number of classes, and define ``forward(pixel_values)`` (class
    logits of ``uint8`` pixels).

    Loss: the cross-entropy of :meth:`loss_logits` against ``labels``. Metrics: top-1 and top-5 accuracy
    (:class:`~ecoflap_pl.metrics.TopKAccuracy`, ``top_k`` capped at the number of classes; a repeated ``image_id``
    counts once, so DDP's padding repeats drop out), logged ``val/top1``, ``val/top5`` (``test/`` likewise) with the
    cross-entropy as ``val/loss`` (:class:`~ecoflap_pl.metrics.MeanLoss`, the mean over samples, each ``image_id``
    once). ``predict_step`` returns ``{"prediction": (B,), "top5": (B, k), "scores": (B, k)}``. A DataModule with
    ``classes`` (``ImageNetDataModule``) must have as many as the classifier (checked at setup).

    Args:
        augment: apply timm's training augmentation in ``training_step``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    pixel_mean: Tensor
    pixel_std: Tensor
    classes_hint: ClassVar[str] = ""
    """The ``HINT`` of a DataModule whose number of classes is not the classifier's; ``{count}``: the data's."""

    def __init__(self, augment: bool, learning_rate: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.augment = augment
        self.metrics = torch.nn.ModuleDict()
        self.num_classes: int | None = None

    def _set_preprocessing(self, data_config: dict[str, Any]) -> None:
        """The collator's evaluation transform, the training augmentation and the normalisation of ``data_config``
        (``timm.data.resolve_data_config``)."""
        self.data_config = data_config
        self.collator = ClassificationCollator(create_transform(**data_config, is_training=False, normalize=False))
        primary, secondary, _ = create_transform(**data_config, is_training=True, separate=True)
        self.train_transform = transforms.Compose(primary.transforms + secondary.transforms)
        self.register_buffer("pixel_mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_config["std"]).view(1, -1, 1, 1), persistent=False)

    @override
    def setup(self, stage: str) -> None:
        """Refuse a DataModule whose classes (``classes``, as :class:`~ecoflap_pl.datamodules.ImageNetDataModule`
        has) are not as many as the classifier's: its label ``i`` is its own ``i``-th class, so against another
        number of logits the loss and accuracy score other classes (10 ImageNet wnid folders, Imagenette, under a
        1000-class classifier: label 0 is tench for both, label 1 English springer for the data and goldfish for the
        classifier)."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(datamodule, "classes", None)
        if classes is None or self.num_classes is None or len(classes) == self.num_classes:
            return
        raise ValueError(
            f"The classifier has {self.num_classes} classes, but {type(datamodule).__name__} has {len(classes)} "
            f"({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}): the data's label i is its own i-th "
            "class, not the classifier's class i, so the loss and accuracy would score other classes. HINT: "
            + self.classes_hint.format(count=len(classes))
        )

    def _build_metrics(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.metrics.clear()
        for prefix in ("val", "test"):
            for k in (1, 5):
                self.metrics[f"{prefix}_top{k}"] = TopKAccuracy(top_k=min(k, num_classes))
            self.metrics[f"{prefix}_loss"] = MeanLoss()

    def normalize(self, pixel_values: Tensor) -> Tensor:
        """``uint8`` (or [0, 255] float) pixels -> the model's normalised float input."""
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def loss_logits(self, pixel_values: Tensor) -> Tensor:
        """The logits the loss is taken of (by default the forward's)."""
        logits: Tensor = self(pixel_values)
        return logits

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> Tensor:
        """Cross-entropy of :meth:`loss_logits` against ``labels``."""
        if "labels" not in batch:
            raise ValueError("Classification calibration and training batches must carry `labels`, got none.")
        return F.cross_entropy(self.loss_logits(batch["pixel_values"]).float(), batch["labels"])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.augment:
            batch = {**batch, "pixel_values": torch.stack([self.train_transform(x) for x in batch["pixel_values"]])}
        return super().training_step(batch, batch_idx)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        logits = self(batch["pixel_values"]).float()
        scores, top = logits.softmax(dim=-1).topk(min(5, logits.shape[-1]), dim=-1)
        return {"prediction": top[:, 0].cpu(), "top5": top.cpu(), "scores": scores.cpu()}

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        if "labels" not in batch:
            raise ValueError(f"Classification {prefix} batches must carry `labels` (the sample's `label`), got none.")
        logits = self(batch["pixel_values"]).float()
        size, ids = logits.shape[0], batch.get("image_id")
        loss = self.metrics[f"{prefix}_loss"]
        assert isinstance(loss, MeanLoss)  # the ModuleDict holds only these and TopKAccuracy
        loss.update(F.cross_entropy(logits, batch["labels"], reduction="none"), ids=ids)
        self.log(f"{prefix}/loss", loss, batch_size=size)
        for k in (1, 5):
            metric = self.metrics[f"{prefix}_top{k}"]
            assert isinstance(metric, TopKAccuracy)  # the ModuleDict holds only these and MeanLoss
            metric.update(logits, batch["labels"], ids=ids)
            self.log(f"{prefix}/top{k}", metric, batch_size=size, prog_bar=k == 1)
