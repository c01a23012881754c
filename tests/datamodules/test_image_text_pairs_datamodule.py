"""ImageTextPairsDataModule over a CC3M-style list of {"image", "caption"}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError, ImageTextPairsDataModule
from tests.datamodules.datamodule_layouts import collate, write_json


def test_pairs(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate)
    train = dm.dataset("train")
    assert len(train) == 10
    sample = train[5]
    assert set(sample) == {"image", "text"} and sample["text"] == "pair number 5"
    assert sample["image"].mode == "RGB" and sample["image"].getpixel((0, 0))[0] == pytest.approx(5, abs=3)


def test_caption_lists_expand_and_image_root(pairs_root: Path) -> None:
    write_json(pairs_root / "val.json", [{"image": "00000/000000001.jpg", "caption": ["one", "two"]}])
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", val_file="val.json", image_root="images")
    val = dm.dataset("val")
    assert [val[i]["text"] for i in range(2)] == ["one", "two"]


def test_val_without_file(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json")
    dm.setup("fit")  # training without validation needs no val_file
    with pytest.raises(ValueError, match="`val_file` must be set.*limit_val_batches: 0"):
        ImageTextPairsDataModule(pairs_root, "cc3m.json").val_dataloader()


def test_errors(pairs_root: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=rf"{pairs_root / 'cc12m.json'}.*`train_file`"):
        ImageTextPairsDataModule(pairs_root, "cc12m.json").dataset("train")
    write_json(pairs_root / "dict.json", {"image": "x.jpg", "caption": "y"})
    with pytest.raises(
        DataFormatError, match=r"dict\.json \(set by `train_file`\): the top level must be a JSON array"
    ):
        ImageTextPairsDataModule(pairs_root, "dict.json").dataset("train")
    entries = json.loads((pairs_root / "cc3m.json").read_text())
    entries[7] = {"img": "x.jpg", "caption": "y"}
    write_json(pairs_root / "bad.json", entries)
    with pytest.raises(DataFormatError, match=r"bad\.json, entry 7: missing key 'image'"):
        ImageTextPairsDataModule(pairs_root, "bad.json").dataset("train")
    image = pairs_root / "images" / "00001" / "000000004.jpg"
    dataset = ImageTextPairsDataModule(pairs_root, "cc3m.json").dataset("train")
    image.unlink()  # after the split was read (test_image_check.py: before): found when its sample is read
    with pytest.raises(DataFileNotFoundError, match=rf"{image} \(for .*cc3m\.json, entry 4\)"):
        dataset[4]
