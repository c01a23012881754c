"""Fixtures: tiny datasets in the official layouts (written by ``datamodule_layouts``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.datamodules.datamodule_layouts import (
    FLICKR_IMAGES,
    NLVR2_LINES,
    captions_of,
    karpathy_original,
    write_coco_images,
    write_coco_karpathy,
    write_coco_official,
    write_coco_original,
    write_image,
    write_json,
    write_vqa,
)


@pytest.fixture
def coco_karpathy(tmp_path: Path) -> Path:
    write_coco_images(tmp_path)
    write_coco_karpathy(tmp_path)
    return tmp_path


@pytest.fixture
def coco_original(tmp_path: Path) -> Path:
    write_coco_images(tmp_path)
    write_coco_original(tmp_path)
    return tmp_path


@pytest.fixture
def coco_official(tmp_path: Path) -> Path:
    write_coco_images(tmp_path)
    write_coco_official(tmp_path)
    return tmp_path


@pytest.fixture
def flickr_karpathy(tmp_path: Path) -> Path:
    """LAVIS ``annotations/flickr30k_{train,val,test}.json`` and ``flickr30k-images/``."""
    for image_id in FLICKR_IMAGES:
        write_image(tmp_path / "flickr30k-images" / f"{image_id}.jpg", image_id)
    train = [
        {"image": f"flickr30k-images/{i}.jpg", "caption": c, "image_id": str(i)}
        for i, s in FLICKR_IMAGES.items()
        if s == "train"
        for c in captions_of(i)
    ]
    write_json(tmp_path / "annotations" / "flickr30k_train.json", train)
    for split in ("val", "test"):
        entries = [
            {"image": f"flickr30k-images/{i}.jpg", "caption": captions_of(i)}
            for i, s in FLICKR_IMAGES.items()
            if s == split
        ]
        write_json(tmp_path / "annotations" / f"flickr30k_{split}.json", entries)
    return tmp_path


@pytest.fixture
def flickr_original(tmp_path: Path) -> Path:
    """Karpathy's ``dataset_flickr30k.json`` (no filepath) and ``flickr30k-images/``."""
    for image_id in FLICKR_IMAGES:
        write_image(tmp_path / "flickr30k-images" / f"{image_id}.jpg", image_id)
    write_json(tmp_path / "dataset_flickr30k.json", karpathy_original(FLICKR_IMAGES, None, lambda i: f"{i}.jpg", None))
    return tmp_path


@pytest.fixture
def vqa_root(tmp_path: Path) -> Path:
    return write_vqa(tmp_path)


@pytest.fixture
def nlvr2_root(tmp_path: Path) -> Path:
    """``{train,dev,test1}.json`` (JSON lines) and PNG image pairs (train ones in ``train/{directory}/``)."""
    for split, lines in NLVR2_LINES.items():
        rows = []
        for identifier, label, directory in lines:
            row = {
                "identifier": identifier,
                "sentence": f"{identifier} holds",
                "label": label,
                "left_url": "http://x/l.jpg",
                "right_url": "http://x/r.jpg",
                "synset": "dog",
                "query": "dogs",
                "writer": "w",
                "validation": {},
            }
            folder = tmp_path / split
            if directory is not None:
                row["directory"] = directory
                folder = folder / str(directory)
            pair = identifier.rsplit("-", 1)[0]
            write_image(folder / f"{pair}-img0.png", 1, "PNG")
            write_image(folder / f"{pair}-img1.png", 2, "PNG")
            rows.append(json.dumps(row))
        (tmp_path / f"{split}.json").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture
def pairs_root(tmp_path: Path) -> Path:
    """A CC3M-style list ``[{"image", "caption"}]`` with images in nested folders."""
    entries = []
    for i in range(10):
        write_image(tmp_path / "images" / f"{i // 4:05d}" / f"{i:09d}.jpg", i)
        entries.append({"image": f"images/{i // 4:05d}/{i:09d}.jpg", "caption": f"pair number {i}"})
    write_json(tmp_path / "cc3m.json", entries)
    return tmp_path
