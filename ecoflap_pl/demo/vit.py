"""The demo timm ViT: a small ``vit_base_patch16_224``-family classifier trained here on the ImageNet-layout digits.

:func:`demo_vit` returns the trained weights (``model.safetensors``); :func:`vit_model_config` gives the
``model_config`` with which :class:`~ecoflap_pl.tasks.ClassificationTask` rebuilds the architecture and loads them
through timm's own ``pretrained_cfg_overlay`` (the way a local timm checkpoint is loaded in any config). Training is
one ``Trainer.fit`` of a ``ClassificationTask`` on :class:`~ecoflap_pl.datamodules.ImageNetDataModule`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ecoflap_pl.datamodules import ImageNetDataModule
from ecoflap_pl.demo.cache import cached_build, demo_dir
from ecoflap_pl.demo.data import WNIDS, DemoPaths
from ecoflap_pl.demo.datamodules import demo_data
from ecoflap_pl.demo.presets import VitRecipe, get_preset
from ecoflap_pl.demo.training import fit
from ecoflap_pl.tasks.classification import ClassificationTask

TIMM_ARCHITECTURE = "vit_base_patch16_224"
"""The registered timm architecture the demo ViT shrinks."""
WEIGHTS_FILE = "model.safetensors"
RECIPE_VERSION = 2


def vit_model_config(recipe: VitRecipe, weights: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``timm.create_model`` arguments of the demo ViT; with ``weights``, loading that file as its weights."""
    config: dict[str, Any] = {
        "num_classes": len(WNIDS),
        "img_size": recipe.image_size,
        "patch_size": recipe.patch_size,
        "embed_dim": recipe.hidden_size,
        "depth": recipe.layers,
        "num_heads": 4,
        "mlp_ratio": recipe.mlp_ratio,
    }
    # crop_pct 1: evaluation sees the whole image (timm's default 0.9 crop would cut the grid of digit cells)
    config["pretrained_cfg_overlay"] = {"crop_pct": 1.0} if weights is None else {"crop_pct": 1.0, "file": str(weights)}
    return config


def train_demo_vit(out: Path, paths: DemoPaths, recipe: VitRecipe) -> None:
    """Train the demo ViT on the ImageNet-layout digits; write its weights to ``out / model.safetensors``.

    timm's training augmentation is off: its horizontal flips and small random crops do not preserve digits.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        task = ClassificationTask(
            timm_model=TIMM_ARCHITECTURE,
            pretrained=False,
            model_config=vit_model_config(recipe),
            augment=False,
            learning_rate=recipe.learning_rate,
            warmup_steps=max(1, recipe.steps // 20),
        )
    data = ImageNetDataModule(
        paths.imagenet, batch_size=recipe.batch_size, class_names_file="class_names.json", shuffle_seed=recipe.seed
    )
    data.collate_fn = task.collator
    fit(task, data, recipe.steps, recipe.seed, "Training the demo ViT")
    save_file({name: tensor.contiguous() for name, tensor in task.model.state_dict().items()}, out / WEIGHTS_FILE)


def demo_vit(preset: str = "default", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The trained demo ViT weights of ``preset`` (a ``model.safetensors`` file), trained on the first call."""
    chosen = get_preset(preset)
    paths = demo_data(preset, cache_dir)
    params = chosen.model_marker("vit", RECIPE_VERSION, recipe=chosen.vit)
    target = demo_dir(cache_dir) / "models" / f"vit-{chosen.name}"
    return cached_build(target, params, lambda out: train_demo_vit(out, paths, chosen.vit)) / WEIGHTS_FILE
