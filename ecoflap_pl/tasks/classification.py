"""ImageNet classification with a timm classifier (ViT, EVA); CLIP / SigLIP zero-shot is
:class:`~ecoflap_pl.tasks.zero_shot.ZeroShotClassificationTask`."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
from timm.data import resolve_data_config
from torch import Tensor
from typing_extensions import override

from ecoflap_pl.export import is_sparse_export, load_pruned_state_dict
from ecoflap_pl.models.hub_access import hub_model_errors, timm_hub_model
from ecoflap_pl.tasks.image_classification import ImageClassificationTask


class ClassificationTask(ImageClassificationTask):
    """Image classification with a timm classifier.

    ``timm.create_model(timm_model, pretrained=pretrained, **model_config)``; loss = cross-entropy of the classifier
    against the labels. Transforms from ``timm.data.resolve_data_config`` at the model's input size and
    ``create_transform`` (evaluation transform in the collator, training transform in ``training_step``). Metrics
    and predictions: see :class:`~ecoflap_pl.tasks.image_classification.ImageClassificationTask`.

    Args:
        timm_model: a timm model name (``vit_base_patch16_224.augreg_in21k_ft_in1k``,
            ``eva_giant_patch14_224.clip_ft_in1k``).
        pretrained: load timm's weights for the name (or the local file of ``pretrained_cfg_overlay``).
        model_config: extra ``timm.create_model`` keyword arguments (``num_classes``, ``img_size``, ...;
            ``pretrained_cfg_overlay: {file: ...}`` with ``pretrained: true`` loads a local checkpoint, such as the
            ``model.safetensors`` of a ``pruning.save_to`` folder in any ``save_format``).
        class_names: readable class names in label order, only checked against the classifier's number of classes.
        augment: apply timm's training augmentation in ``training_step``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    classes_hint = (
        "evaluate on every class the classifier was trained on (ImageNet-1k: the 1000 wnid folders), or give it a "
        "head of {count} classes (model_config: {{num_classes: {count}}}) and fine-tune it."
    )

    def __init__(
        self,
        timm_model: str,
        pretrained: bool | None = None,
        model_config: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        augment: bool = True,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(augment, learning_rate, weight_decay, warmup_steps)
        self.save_hyperparameters()
        if pretrained is not None and not isinstance(pretrained, bool):
            raise ValueError(
                f"`pretrained` must be a bool with `timm_model`, got {pretrained!r}. HINT: name the weights in "
                "timm_model (vit_base_patch16_224.augreg_in21k_ft_in1k) with pretrained: true, load a file with "
                "model_config: {pretrained_cfg_overlay: {file: /path/model.safetensors}}, or use "
                "ZeroShotClassificationTask for a CLIP / SigLIP from_pretrained name."
            )
        config = dict(model_config or {})
        overlay = config.get("pretrained_cfg_overlay")
        local_file = overlay.get("file") if isinstance(overlay, dict) else None
        if isinstance(overlay, dict) and isinstance(local_file, str):
            # a config file's `~/...` reaches timm unexpanded (no shell reads it), and timm's loader answers a file it
            # cannot find with a FileNotFoundError that has no message
            local_file = os.path.expanduser(local_file)
            overlay = config["pretrained_cfg_overlay"] = {**overlay, "file": local_file}
            if pretrained and not Path(local_file).is_file():
                raise FileNotFoundError(
                    f"`model_config.pretrained_cfg_overlay.file` {local_file!r} is not a file. HINT: name the "
                    "checkpoint itself (a .safetensors, .pth or .bin file; for a `pruning.save_to` folder, its "
                    "model.safetensors)."
                )
        if local_file is not None and not pretrained:
            raise ValueError(
                f"`model_config.pretrained_cfg_overlay.file` is {local_file!r}, but `pretrained` is {pretrained!r}: "
                "timm loads that file only with pretrained weights, so the model would start from random weights. "
                "HINT: set pretrained: true to load the file, or drop pretrained_cfg_overlay.file."
            )
        if isinstance(overlay, dict) and local_file is not None and "num_classes" in config:
            # timm drops a checkpoint's classifier when its size differs from the hub config's num_classes (1000
            # for ImageNet names); a local file's classifier is sized for this model, so keep it
            config["pretrained_cfg_overlay"] = {"num_classes": config["num_classes"], **overlay}
        hub_model = timm_hub_model(timm_model) if pretrained and local_file is None else None
        # timm cannot decode the file of a `pruning.save_to` folder written in a sparse save_format: decoded here
        folder = Path(local_file).parent if local_file is not None else None
        sparse_export = folder if folder is not None and is_sparse_export(folder) else None
        with hub_model_errors(hub_model) if hub_model is not None else nullcontext():
            self.model = timm.create_model(timm_model, pretrained=bool(pretrained) and not sparse_export, **config)
        if sparse_export is not None:
            self.model.load_state_dict(load_pruned_state_dict(sparse_export)[0])
        num_classes = int(getattr(self.model, "num_classes"))  # noqa: B009 (timm types its models as nn.Module)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"`class_names` must name the classifier's {num_classes} classes, got {len(class_names)} names. "
                "HINT: timm classifiers do not need class_names; omit them."
            )
        self.class_names = None if class_names is None else list(class_names)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        args = {"input_size": (3, *img_size)} if img_size is not None else {}
        self._set_preprocessing(resolve_data_config(args, model=self.model))
        self._build_metrics(num_classes)

    @override
    def forward(self, pixel_values: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of ``uint8`` pixels ``(B, C, H, W)``."""
        pixels = self.normalize(pixel_values).to(next(self.model.parameters()).dtype)
        logits: Tensor = self.model(pixels)
        return logits
