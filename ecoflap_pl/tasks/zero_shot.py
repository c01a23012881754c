"""Zero-shot image classification with a dual encoder (CLIP, SigLIP): images against prompted class names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor
from transformers import CLIPModel, PretrainedConfig, SiglipModel
from typing_extensions import override

from ecoflap_pl.models.loading import build_hf_model, check_tokenizer_source, expand_home
from ecoflap_pl.tasks.families import family_for
from ecoflap_pl.tasks.families.towers import pooled
from ecoflap_pl.tasks.image_classification import ImageClassificationTask
from ecoflap_pl.tasks.model_config import load_config

DEFAULT_TEMPLATES = ("a photo of a {}.",)
"""Zero-shot prompt templates (CLIP's basic prompt). CLIP's paper ensembles 80 ImageNet templates; each template
multiplies the text forwards of a loss that runs the text tower (``text_tower_in_loss``), so the default is one."""
_PIL_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ZeroShotClassificationTask(ImageClassificationTask):
    """Zero-shot image classification with CLIP (``CLIPModel``) or SigLIP (``SiglipModel``), by the config's
    ``model_type``, from ``pretrained`` (a ``from_pretrained`` name or directory) or ``model_config``.

    Each class is embedded once per template (``template.format(name)``; SigLIP's prompts are padded to its text
    length without an attention mask, as it was trained), the normalised embeddings are averaged over templates and
    re-normalised (CLIP's prompt ensembling); logits = ``logit_scale * cos(image, class)``. Loss = cross-entropy of
    these zero-shot logits (EVA-ViT's coarse loss in ECoFLaP). Class names come from ``class_names`` or, when None,
    from the DataModule's ``class_names`` at setup. In evaluation the class embeddings are computed once per epoch.
    Metrics and predictions: see :class:`~ecoflap_pl.tasks.image_classification.ImageClassificationTask`.

    Args:
        pretrained: a ``from_pretrained`` name or directory (``openai/clip-vit-base-patch16``,
            ``google/siglip-base-patch16-224``), or None with ``model_config``.
        model_config: the ``CLIPConfig`` (or ``SiglipConfig``) as a dict, for a random-initialised model.
        tokenizer: a tokenizer directory; required with ``model_config``, optional with ``pretrained``.
        class_names: readable class names in label order.
        templates: prompt templates with one ``{}`` for the class name.
        text_tower_in_loss: the loss embeds the class prompts with gradients (the text tower gets importance
            scores and is fine-tuned; every loss call runs ``classes x templates`` prompts). False: class
            embeddings computed once without gradients (cheaper; prune only the vision tower then, as the
            EVA-ViT runs do).
        augment: apply timm's training augmentation in ``training_step``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    model: CLIPModel | SiglipModel
    classes_hint = "leave `class_names` out to take the DataModule's, or give one name per class of the data ({count})."

    def __init__(
        self,
        pretrained: str | None = None,
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
        super().__init__(augment, learning_rate, weight_decay, warmup_steps)
        self.save_hyperparameters()
        self.templates = _check_templates(templates)
        self.text_tower_in_loss = text_tower_in_loss
        self.class_names: list[str] | None = None
        self._prompts: dict[str, Tensor] | None = None
        self._class_embeds: Tensor | None = None
        if isinstance(pretrained, bool):
            raise ValueError(
                f"`pretrained` must be a CLIP from_pretrained name or directory, got {pretrained!r}. HINT: use "
                "ClassificationTask(timm_model=...) for a timm classifier, or pretrained: openai/clip-vit-base-patch16."
            )
        check_tokenizer_source(model_config, tokenizer)
        pretrained, tokenizer = expand_home(pretrained), expand_home(tokenizer)
        if model_config is not None:
            model_config = {"model_type": "clip", **model_config}  # CLIP unless the dict names its type
        config = load_config(pretrained, model_config, example="openai/clip-vit-base-patch16")
        self.family_adapter = family_for(config.model_type, "zero_shot")
        towers = self.family_adapter.towers
        self.prompt_padding = "longest" if towers is None or towers.text_attention_mask else "max_length"
        model_class = self.family_adapter.model_classes["zero_shot"]
        # the zero-shot families are dual encoders with CLIP's feature methods (CLIPModel, SiglipModel)
        self.model = cast("CLIPModel | SiglipModel", build_hf_model(model_class, pretrained, model_config))
        image_processor, self.tokenizer = self.family_adapter.processor_parts(self.model.config, pretrained, tokenizer)
        self._set_preprocessing(self._data_config(image_processor if pretrained is not None else None))
        if class_names is not None:
            self.set_class_names(class_names)

    def _data_config(self, image_processor: Any) -> dict[str, Any]:
        """timm's data config: the family's normalisation at the vision tower's size, or that of the
        ``from_pretrained`` model's image processor."""
        model_config: PretrainedConfig = self.model.config  # CLIP's and SigLIP's share these fields
        size = model_config.vision_config.image_size
        config: dict[str, Any] = {
            "input_size": (3, size, size),
            "interpolation": "bicubic",
            "mean": self.family_adapter.pixel_mean,
            "std": self.family_adapter.pixel_std,
            "crop_pct": 1.0,
        }
        if image_processor is not None:
            crop = (getattr(image_processor, "crop_size", None) or image_processor.size)["height"]  # SigLIP: no crop
            config.update(
                input_size=(3, crop, crop),
                mean=tuple(image_processor.image_mean),
                std=tuple(image_processor.image_std),
                crop_pct=crop / image_processor.size.get("shortest_edge", crop),
                interpolation=_PIL_INTERPOLATION.get(int(image_processor.resample), "bicubic"),
            )
        data_config: dict[str, Any] = resolve_data_config(config)
        return data_config

    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Set the zero-shot classes (label order) and tokenize their prompts."""
        if isinstance(class_names, str) or len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
            raise ValueError(f"`class_names` must be a list of at least 2 strings, got {class_names!r}.")
        self.class_names = list(class_names)
        prompts = [template.format(name) for name in self.class_names for template in self.templates]
        model_config: PretrainedConfig = self.model.config
        positions = model_config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            prompts,
            padding=self.prompt_padding,
            truncation=True,
            max_length=min(self.tokenizer.model_max_length, positions),
            return_tensors="pt",
        )
        self._prompts = {"input_ids": tokens["input_ids"]}
        if self.prompt_padding == "longest":
            self._prompts["attention_mask"] = tokens["attention_mask"]
        self._class_embeds = None
        self._build_metrics(len(self.class_names))
        self.metrics.to(self.device)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.class_names is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
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
        prompts = {key: value.to(self.device) for key, value in self._prompts.items()}
        size = chunk_size
        embeds = torch.cat(
            [
                pooled(self.model.get_text_features(**{key: part[s : s + size] for key, part in prompts.items()}))
                for s in range(0, len(prompts["input_ids"]), size)
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

    @override
    def forward(self, pixel_values: Tensor, text_grad: bool = False) -> Tensor:
        """Class logits ``(B, num_classes)`` of ``uint8`` pixels ``(B, C, H, W)``; ``text_grad`` embeds the classes
        with gradients."""
        pixels = self.normalize(pixel_values).to(next(self.model.vision_model.parameters()).dtype)
        images = F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        classes = self.class_embeddings() if text_grad else self._cached_class_embeddings()
        return self.model.logit_scale.exp().float() * images @ classes.T

    @override
    def loss_logits(self, pixel_values: Tensor) -> Tensor:
        """The zero-shot logits, with the text tower in the graph when ``text_tower_in_loss``."""
        return self(pixel_values, text_grad=self.text_tower_in_loss)


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(
            f"`templates` must be a non-empty list of strings with one '{{}}' for the class name, got {templates!r}. "
            "HINT: ['a photo of a {}.']."
        )
    return tuple(templates)
