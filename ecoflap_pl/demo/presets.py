"""Demo presets: how large the demo data and models are, and how long the models train.

``"default"`` is the demo a newcomer runs (under five minutes on a 2-core CPU the first time, seconds after).
``"tiny"`` builds the same pipeline at a size that runs in seconds: the end-to-end tests use it; its models are not
trained long enough to be good. Every preset field is recorded in the cache markers, so changing one retrains what
depends on it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecoflap_pl.demo.data import DATA_VERSION, DemoPaths, Progress, build_demo_data


@dataclass(frozen=True)
class DemoDataSize:
    """Arguments of :func:`~ecoflap_pl.demo.data.build_demo_data` (see its docstring)."""

    train_images: int = 2000
    val_images: int = 300
    test_images: int = 300
    imagenet_train_images: int = 2000
    imagenet_val_images: int = 500
    questions_per_image: int = 3
    image_size: int = 48
    seed: int = 0

    def build(self, root: str | os.PathLike[str], progress: Progress | None = None) -> DemoPaths:
        """Build (or reuse) the demo datasets of this size under ``root``."""
        return build_demo_data(root, progress=progress, **asdict(self))


@dataclass(frozen=True)
class Blip2Recipe:
    """The demo BLIP-2 (OPT language model) and how it is trained on the demo VQA questions and captions.

    Its vision tower is the demo ViT (:class:`VitRecipe`), trained first and kept frozen, as BLIP-2's is a pretrained
    ViT. The defaults come from a sweep of recipes at equal CPU time (``benchmarks/RESULTS.md``, "The demo BLIP-2
    recipe"); they train in about four and a half minutes on a 2-core CPU. The OPT model keeps two blocks, so that
    ECoFLaP finds it as a stack of blocks to prune.

    Attributes:
        hidden_size: width of the Q-Former and the OPT model (divisible by ``attention_heads``).
        attention_heads: attention heads of the Q-Former and the OPT model.
        dropout: dropout of the Q-Former and the OPT model (the small model underfits, so none by default).
        qformer_layers: Q-Former blocks (every one cross-attends to the image).
        language_layers: OPT decoder blocks (at least two, or pruning leaves the language model dense).
        num_query_tokens: Q-Former queries, i.e. image tokens the language model reads.
        vocab_size: WordPiece vocabulary trained on the demo corpus (upper bound).
        steps: optimizer steps.
        batch_size: samples per step (batches of VQA questions and of captions, in proportion to their numbers;
            at equal CPU time, 32 learns more than 64).
        learning_rate: AdamW peak learning rate (linear warm-up over 5% of the steps, then cosine decay; at 5e-4 the
            accuracy reached in a given number of steps varied about three times as much between seeds).
        freeze_vision: keep the vision tower's weights as the demo ViT trained them (BLIP-2's recipe); it also saves
            the tower's backward pass.
        seed: seeds the initialisation, the data order and dropout.
    """

    hidden_size: int = 256
    attention_heads: int = 8
    dropout: float = 0.0
    qformer_layers: int = 1
    language_layers: int = 2
    num_query_tokens: int = 4
    vocab_size: int = 512
    steps: int = 4200
    batch_size: int = 32
    learning_rate: float = 4e-4
    freeze_vision: bool = True
    seed: int = 0


@dataclass(frozen=True)
class VitRecipe:
    """The demo timm ViT classifier of the ImageNet-layout digits and how it is trained.

    The default patch is a cell of the demo images' 3x3 grid (``image_size // 3``), so each digit is one token.

    Attributes:
        hidden_size: embedding width (divisible by 4 attention heads).
        layers: transformer blocks.
        mlp_ratio: MLP width over ``hidden_size``.
        image_size: model input resolution.
        patch_size: patch size.
        steps: optimizer steps.
        batch_size: images per step.
        learning_rate: AdamW peak learning rate (linear warm-up over 5% of the steps, then cosine decay; at 1e-3
            the loss sat at chance for the first 400 steps).
        seed: seeds the initialisation, the data order and dropout.
    """

    hidden_size: int = 128
    layers: int = 2
    mlp_ratio: int = 2
    image_size: int = 48
    patch_size: int = 16
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 5e-4
    seed: int = 0


@dataclass(frozen=True)
class DemoPreset:
    """A demo size: the data, the BLIP-2 and the ViT recipes."""

    name: str
    data: DemoDataSize = field(default_factory=DemoDataSize)
    blip2: Blip2Recipe = field(default_factory=Blip2Recipe)
    vit: VitRecipe = field(default_factory=VitRecipe)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as the cache markers record it."""
        return asdict(self)

    def model_marker(self, kind: str, recipe_version: int, **recipes: Any) -> dict[str, Any]:
        """What a demo model trained at this size depends on, as its cache marker records it: its ``kind``, the
        version of its training code, the demo data (version and size) and each recipe it is built from."""
        marker: dict[str, Any] = {
            "kind": kind,
            "recipe_version": recipe_version,
            "data_version": DATA_VERSION,
            "data": asdict(self.data),
        }
        return {**marker, **{name: asdict(recipe) for name, recipe in recipes.items()}}

    def data_dir(self, root: Path) -> Path:
        """Where this preset's datasets live under the demo cache ``root``."""
        return root / "data" / self.name


PRESETS: dict[str, DemoPreset] = {
    "default": DemoPreset("default"),
    "tiny": DemoPreset(
        "tiny",
        data=DemoDataSize(
            train_images=24,
            val_images=6,
            test_images=4,
            imagenet_train_images=20,
            imagenet_val_images=10,
            questions_per_image=1,
            image_size=32,
        ),
        blip2=Blip2Recipe(hidden_size=32, attention_heads=4, num_query_tokens=4, vocab_size=256, steps=3, batch_size=4),
        vit=VitRecipe(hidden_size=32, image_size=32, patch_size=8, steps=3, batch_size=4),
    ),
}
"""The demo sizes by name."""


def get_preset(name: str) -> DemoPreset:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(
            f"`preset` must be one of {sorted(PRESETS)}, got {name!r}. HINT: 'default' is the demo; 'tiny' is the "
            "seconds-long size the tests run."
        )
    return PRESETS[name]
