"""ImageNet classification: a timm ViT / EVA classifier, or CLIP zero-shot with prompted class names.

Images are preprocessed in two stages. The collator (the one ``collate_fn`` the DataModule gives every loader,
calibration included) applies timm's deterministic evaluation transform without normalisation and batches
``uint8`` pixels. The task then normalises them on the device and, in ``training_step`` only, first applies timm's
training augmentation (random resized crop, flip, colour jitter) image by image. Doing the augmentation in the
collator would need to know which loader it serves, which a collate function running in a DataLoader worker cannot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchvision import transforms
from transformers import AutoProcessor, CLIPModel
from typing_extensions import override

from ecoflap_pl.models.loading import build_hf_model, check_tokenizer_source, load_tokenizer
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
"""Zero-shot prompt templates (CLIP's basic prompt). CLIP's paper ensembles 80 ImageNet templates; each template
multiplies the text forwards of a loss that runs the text tower (``text_tower_in_loss``), so the default is one."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ClassificationCollator:
    """Turns ``{"image", "label"}`` samples into ``{"pixel_values": uint8 (B, C, H, W), "labels": (B,)}``.

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
        return batch


class ClassificationTask(EcoflapTask):
    """Image classification with a timm classifier, or CLIP zero-shot classification.

    **timm** (``timm_model`` set): ``timm.create_model(timm_model, pretrained=pretrained, **model_config)``; loss =
    cross-entropy of the classifier against the labels. Transforms from ``timm.data.resolve_data_config`` at the
    model's input size and ``create_transform`` (evaluation transform in the collator, training transform in
    ``training_step``).

    **CLIP zero-shot** (``timm_model`` None): a ``CLIPModel`` from ``pretrained`` (a ``from_pretrained`` name or
    directory) or ``model_config``. Each class is embedded once per template (``template.format(name)``), the
    normalised embeddings are averaged over templates and re-normalised (CLIP's prompt ensembling); logits =
    ``logit_scale * cos(image, class)``. Loss = cross-entropy of these zero-shot logits (EVA-ViT's coarse loss in
    ECoFLaP). Class names come from ``class_names`` or, when None, from the DataModule's ``class_names`` at setup.
    In evaluation the class embeddings are computed once per epoch.

    Metrics: top-1 and top-5 accuracy (``top_k`` capped at the number of classes), logged ``val/top1``,
    ``val/top5`` (``test/`` likewise) with the cross-entropy as ``val/loss``. ``predict_step`` returns
    ``{"prediction": (B,), "top5": (B, k), "scores": (B, k)}``.

    Args:
        timm_model: a timm model name (``vit_base_patch16_224.augreg_in21k_ft_in1k``,
            ``eva_giant_patch14_224.clip_ft_in1k``); None selects CLIP zero-shot.
        pretrained: timm: bool, load timm's weights for the name. CLIP: a ``from_pretrained`` name or directory
            (``openai/clip-vit-base-patch16``), or None with ``model_config``.
        model_config: timm: extra ``timm.create_model`` keyword arguments (``num_classes``, ``img_size``, ...;
            ``pretrained_cfg_overlay: {file: ...}`` loads a local checkpoint). CLIP: the ``CLIPConfig`` as a dict.
        tokenizer: CLIP: a tokenizer directory; required with ``model_config``, optional with ``pretrained``.
        class_names: readable class names in label order (CLIP: the zero-shot classes; timm: only checked
            against the classifier's number of classes).
        templates: CLIP: prompt templates with one ``{}`` for the class name.
        text_tower_in_loss: CLIP: the loss embeds the class prompts with gradients (the text tower gets importance
            scores and is fine-tuned; every loss call runs ``classes x templates`` prompts). False: class
            embeddings computed once without gradients (cheaper; prune only the vision tower then, as the
            EVA-ViT runs do).
        augment: apply timm's training augmentation in ``training_step``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        timm_model: str | None = None,
        pretrained: bool | str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        class_names: list[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        text_tower_in_loss: bool = True,
        augment: bool = True,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.zero_shot = timm_model is None
        self.templates = _check_templates(templates)
        self.text_tower_in_loss = text_tower_in_loss
        self.augment = augment
        self.tokenizer: Any = None
        self.class_names: list[str] | None = None
        self._prompts: dict[str, Tensor] | None = None
        self._class_embeds: Tensor | None = None
        if self.zero_shot:
            data_config = self._build_clip(pretrained, model_config, tokenizer)
        else:
            data_config = self._build_timm(str(timm_model), pretrained, model_config)
        self.data_config = data_config
        self.collator = ClassificationCollator(create_transform(**data_config, is_training=False, normalize=False))
        primary, secondary, _ = create_transform(**data_config, is_training=True, separate=True)
        self.train_transform = transforms.Compose(primary.transforms + secondary.transforms)
        self.register_buffer("pixel_mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_config["std"]).view(1, -1, 1, 1), persistent=False)
        self.metrics = torch.nn.ModuleDict()
        if not self.zero_shot:
            self._build_metrics(self.model.num_classes)
            if class_names is not None and len(class_names) != self.model.num_classes:
                raise ValueError(
                    f"`class_names` must name the classifier's {self.model.num_classes} classes, got "
                    f"{len(class_names)} names. HINT: timm classifiers do not need class_names; omit them."
                )
            self.class_names = None if class_names is None else list(class_names)
        elif class_names is not None:
            self.set_class_names(class_names)

    def _build_timm(self, name: str, pretrained: bool | str | None, model_config: dict[str, Any] | None) -> dict:
        if pretrained is not None and not isinstance(pretrained, bool):
            raise ValueError(
                f"`pretrained` must be a bool with `timm_model`, got {pretrained!r}. HINT: name the weights in "
                "timm_model (vit_base_patch16_224.augreg_in21k_ft_in1k) with pretrained: true, or load a file with "
                "model_config: {pretrained_cfg_overlay: {file: /path/model.safetensors}}."
            )
        config = dict(model_config or {})
        overlay = config.get("pretrained_cfg_overlay")
        if pretrained and isinstance(overlay, dict) and "file" in overlay and "num_classes" in config:
            # timm drops a checkpoint's classifier when its size differs from the hub config's num_classes (1000
            # for ImageNet names); a local file's classifier is sized for this model, so keep it
            config["pretrained_cfg_overlay"] = {"num_classes": config["num_classes"], **overlay}
        self.model = timm.create_model(name, pretrained=bool(pretrained), **config)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        args = {"input_size": (3, *img_size)} if img_size is not None else {}
        return resolve_data_config(args, model=self.model)

    def _build_clip(self, pretrained: bool | str | None, model_config: dict[str, Any] | None, tokenizer: str | None):
        if isinstance(pretrained, bool):
            raise ValueError(
                f"`pretrained` must be a CLIP from_pretrained name or directory without `timm_model`, got "
                f"{pretrained!r}. HINT: set timm_model for a timm classifier, or pretrained: "
                "openai/clip-vit-base-patch16."
            )
        check_tokenizer_source(model_config, tokenizer)
        self.model = build_hf_model(CLIPModel, pretrained, model_config)
        size = self.model.config.vision_config.image_size
        config = {"input_size": (3, size, size), "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
        config["crop_pct"] = 1.0
        if pretrained is not None:
            processor = AutoProcessor.from_pretrained(pretrained)
            self.tokenizer = processor.tokenizer
            image = processor.image_processor
            crop = image.crop_size["height"]
            config.update(
                input_size=(3, crop, crop),
                mean=tuple(image.image_mean),
                std=tuple(image.image_std),
                crop_pct=crop / image.size.get("shortest_edge", crop),
                interpolation=_PIL_INTERPOLATION.get(int(image.resample), "bicubic"),
            )
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer)
        return resolve_data_config(config)

    def _build_metrics(self, num_classes: int) -> None:
        for prefix in ("val", "test"):
            for k in (1, 5):
                self.metrics[f"{prefix}_top{k}"] = MulticlassAccuracy(
                    num_classes=num_classes, top_k=min(k, num_classes), average="micro"
                )

    # ---------------------------------------------------------------- classes (CLIP)
    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Set the zero-shot classes (label order) and tokenize their prompts."""
        if not self.zero_shot:
            raise ValueError("set_class_names() is for CLIP zero-shot classification (timm_model None).")
        if isinstance(class_names, str) or len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
            raise ValueError(f"`class_names` must be a list of at least 2 strings, got {class_names!r}.")
        self.class_names = list(class_names)
        prompts = [template.format(name) for name in self.class_names for template in self.templates]
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        self._prompts = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        self._class_embeds = None
        self.metrics.clear()
        self._build_metrics(len(self.class_names))
        self.metrics.to(self.device)

    @override
    def setup(self, stage: str) -> None:
        if not self.zero_shot or self.class_names is not None:
            return
        names = getattr(self.trainer.datamodule, "class_names", None) if self.trainer is not None else None
        if names is None:
            raise ValueError(
                "CLIP zero-shot classification needs `class_names`, got none from the task or the DataModule. HINT: "
                "pass class_names, or use a DataModule with a class_names attribute (ImageNetDataModule)."
            )
        self.set_class_names(names)

    def class_embeddings(self, chunk_size: int = 256) -> Tensor:
        """``(num_classes, D)`` normalised class embeddings, each the re-normalised mean of its prompts' embeddings.

        Runs with gradients when they are enabled; prompts go through the text tower ``chunk_size`` at a time.
        """
        if self._prompts is None or self.class_names is None:
            raise ValueError("`class_names` must be set before zero-shot classification. HINT: set_class_names().")
        ids = self._prompts["input_ids"].to(self.device)
        mask = self._prompts["attention_mask"].to(self.device)
        embeds = torch.cat(
            [
                _pooled(
                    self.model.get_text_features(
                        input_ids=ids[s : s + chunk_size], attention_mask=mask[s : s + chunk_size]
                    )
                )
                for s in range(0, len(ids), chunk_size)
            ]
        )
        embeds = F.normalize(embeds.float(), dim=-1).view(len(self.class_names), len(self.templates), -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)

    def _cached_class_embeddings(self) -> Tensor:
        if self._class_embeds is None:
            with torch.no_grad():
                self._class_embeds = self.class_embeddings()
        return self._class_embeds

    # the weights may have changed (training, pruning) since the last epoch: embed the classes again
    @override
    def on_train_epoch_start(self) -> None:
        self._class_embeds = None

    @override
    def on_validation_epoch_start(self) -> None:
        self._class_embeds = None

    @override
    def on_test_epoch_start(self) -> None:
        self._class_embeds = None

    @override
    def on_predict_epoch_start(self) -> None:
        self._class_embeds = None

    # ---------------------------------------------------------------- forward and loss
    def normalize(self, pixel_values: Tensor) -> Tensor:
        """``uint8`` (or [0, 255] float) pixels -> the model's normalised float input."""
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    @override
    def forward(self, pixel_values: Tensor, text_grad: bool = False) -> Tensor:
        """Class logits ``(B, num_classes)`` of ``uint8`` pixels ``(B, C, H, W)``."""
        tower = self.model if not self.zero_shot else self.model.vision_model
        pixels = self.normalize(pixel_values).to(next(tower.parameters()).dtype)
        if not self.zero_shot:
            return self.model(pixels)
        images = F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        classes = self.class_embeddings() if text_grad else self._cached_class_embeddings()
        return self.model.logit_scale.exp().float() * images @ classes.T

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> Tensor:
        """Cross-entropy of the classifier (timm) or of the zero-shot logits (CLIP) against ``labels``."""
        if "labels" not in batch:
            raise ValueError("Classification calibration and training batches must carry `labels`, got none.")
        logits = self(batch["pixel_values"], text_grad=self.zero_shot and self.text_tower_in_loss)
        return F.cross_entropy(logits.float(), batch["labels"])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.augment:
            batch = {**batch, "pixel_values": torch.stack([self.train_transform(x) for x in batch["pixel_values"]])}
        return super().training_step(batch, batch_idx)

    # ---------------------------------------------------------------- evaluation
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
        size = logits.shape[0]
        self.log(f"{prefix}/loss", F.cross_entropy(logits, batch["labels"]), batch_size=size, sync_dist=True)
        for k in (1, 5):
            metric = self.metrics[f"{prefix}_top{k}"]
            metric.update(logits, batch["labels"])
            self.log(f"{prefix}/top{k}", metric, batch_size=size, prog_bar=k == 1)


def _pooled(output: Any) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output is projected; 4.x returns the tensor itself
    return output if isinstance(output, Tensor) else output.pooler_output


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(
            f"`templates` must be a non-empty list of strings with one '{{}}' for the class name, got {templates!r}. "
            "HINT: ['a photo of a {}.']."
        )
    return tuple(templates)
