"""The demo's ImageNet layouts: single digits in per-wnid train and val folders, the flat Kaggle val variant and
the class-name files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ecoflap_pl.demo.data.files import Progress, write_bytes, write_json
from ecoflap_pl.demo.data.render import encode_image, render_scene
from ecoflap_pl.demo.data.scenes import CLASS_NAMES, WNIDS, Scene, cell_digit, seeded_rng


def write_imagenet(
    imagenet: Path,
    imagenet_flat: Path,
    glyphs: Sequence[Image.Image],
    pools: dict[str, list[np.ndarray]],
    seed: int,
    image_size: int,
    train_images: int,
    val_images: int,
    progress: Progress | None,
) -> dict[str, list[dict]]:
    """Per-wnid train/val folders under ``imagenet``, the flat Kaggle val variant under ``imagenet_flat`` (its
    ``train`` a link to ``imagenet/train``) and the class-name files of both; returns the ground truth."""
    mapping = "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, CLASS_NAMES, strict=True))
    truth: dict[str, list[dict]] = {}
    solution = ["ImageId,PredictionString"]
    for split, count, pool in (("train", train_images, "train"), ("val", val_images, "val")):
        rng = seeded_rng(seed, "imagenet", split)
        truth[split] = []
        per_class = [0] * 10
        for i in range(count):
            value = i % 10
            digit = cell_digit(rng, value, int(rng.integers(3)), pools[pool], image_size)
            x, y, size = digit.x, digit.y, digit.size
            image = render_scene(Scene(i + 1, (digit,)), glyphs, image_size, rng)
            wnid = WNIDS[value]
            if split == "train":
                file = f"train/{wnid}/{wnid}_{per_class[value]}.JPEG"
            else:
                stem = f"ILSVRC2012_val_{i + 1:08d}"
                file = f"val/{wnid}/{stem}.JPEG"
                solution.append(f"{stem},{wnid} {x} {y} {x + size - 1} {y + size - 1}")
            per_class[value] += 1
            jpeg = encode_image(image, "JPEG")
            write_bytes(imagenet / file, jpeg)
            if split == "val":
                write_bytes(imagenet_flat / "val" / Path(file).name, jpeg)
            truth[split].append({"file": file, "label": value, **asdict(digit)})
            if progress is not None:
                progress(f"imagenet {split}", i + 1, count)
    for folder in (imagenet, imagenet_flat):
        (folder / "LOC_synset_mapping.txt").write_text(mapping)
        write_json(folder / "class_names.json", dict(zip(WNIDS, CLASS_NAMES, strict=True)))
    (imagenet_flat / "LOC_val_solution.csv").write_text("".join(f"{row}\n" for row in solution))
    (imagenet_flat / "train").symlink_to(os.path.relpath(imagenet / "train", imagenet_flat), target_is_directory=True)
    return truth
