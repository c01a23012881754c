"""NLVR2DataModule over the official JSON-lines files and PNG image pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError, NLVR2DataModule
from tests.datamodules.datamodule_layouts import NLVR2_LINES, collate


@pytest.mark.parametrize(("stage", "split"), [("train", "train"), ("val", "dev"), ("test", "test1")])
def test_every_split(nlvr2_root: Path, stage: str, split: str) -> None:
    dataset = NLVR2DataModule(nlvr2_root, collate_fn=collate).dataset(stage)
    assert len(dataset) == len(NLVR2_LINES[split])
    for index, (identifier, label, directory) in enumerate(NLVR2_LINES[split]):
        sample = dataset[index]
        assert set(sample) == {"images", "identifier", "sentence", "label"}
        assert (sample["identifier"], sample["label"]) == (identifier, int(label == "True"))
        assert sample["sentence"] == f"{identifier} holds"
        left, right = sample["images"]
        assert left.mode == right.mode == "RGB" and left.getpixel((0, 0))[0] == 1 and right.getpixel((0, 0))[0] == 2
        folder = nlvr2_root / split / (str(directory) if directory is not None else "")
        pair = identifier.rsplit("-", 1)[0]
        assert dataset.samples[index].images == (str(folder / f"{pair}-img0.png"), str(folder / f"{pair}-img1.png"))


def test_images_folder_is_found(nlvr2_root: Path) -> None:
    images = nlvr2_root / "images"
    images.mkdir()
    for split in ("train", "dev", "test1"):
        (nlvr2_root / split).rename(images / split)
    assert NLVR2DataModule(nlvr2_root).dataset("val")[0]["label"] == 1


def test_missing_file_names_path_and_option(tmp_path: Path) -> None:
    with pytest.raises(
        DataFileNotFoundError, match=rf"{tmp_path / 'dev.json'}.*{tmp_path / 'data' / 'dev.json'}.*`val_file`"
    ):
        NLVR2DataModule(tmp_path).dataset("val")


def test_corrupt_line(nlvr2_root: Path) -> None:
    path = nlvr2_root / "dev.json"
    path.write_text(path.read_text() + '{"identifier": \n')
    with pytest.raises(DataFormatError, match=rf"{path} \(set by `val_file`\), line 3 is not valid JSON"):
        NLVR2DataModule(nlvr2_root).dataset("val")


def test_train_line_without_directory(nlvr2_root: Path) -> None:
    path = nlvr2_root / "train.json"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["directory"]
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines))
    with pytest.raises(DataFormatError, match=rf"{path}, line 2: missing key 'directory'"):
        NLVR2DataModule(nlvr2_root).dataset("train")


def test_bad_label(nlvr2_root: Path) -> None:
    path = nlvr2_root / "test1.json"
    row = json.loads(path.read_text())
    row["label"] = "true"
    path.write_text(json.dumps(row))
    with pytest.raises(DataFormatError, match="line 1: 'label' must be 'True' or 'False', got 'true'"):
        NLVR2DataModule(nlvr2_root).dataset("test")


def test_missing_right_image_names_identifier(nlvr2_root: Path) -> None:
    image = nlvr2_root / "dev" / "dev-851-1-img1.png"
    dataset = NLVR2DataModule(nlvr2_root).dataset("val")
    image.unlink()  # after the split was read (test_image_check.py: before): found when its sample is read
    with pytest.raises(DataFileNotFoundError, match=rf"{image} \(for identifier 'dev-851-1-3' "):
        dataset[1]


def test_corrupt_image(nlvr2_root: Path) -> None:
    image = nlvr2_root / "train" / "7" / "train-11-2-img0.png"
    image.write_bytes(b"")
    with pytest.raises(DataFormatError, match=rf"{image} \(for identifier 'train-11-2-0' "):
        NLVR2DataModule(nlvr2_root).dataset("train")[2]


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits(nlvr2_root: Path) -> None:
    # PIL's convert("RGB") clips 16-bit values to 255: this picture, half black and half mid-grey, came out white.
    pixels = np.zeros((8, 8), dtype=np.uint16)
    pixels[:, 4:] = 0x8000  # 32768 of 65535: mid-grey, 128 in 8 bits
    left = nlvr2_root / "dev" / "dev-850-0-img0.png"
    Image.fromarray(pixels).save(left)
    assert Image.open(left).mode in {"I;16", "I"}  # "I" in Pillow 10.0, the lowest allowed
    image = NLVR2DataModule(nlvr2_root, collate_fn=collate).dataset("val")[0]["images"][0]
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((7, 0)) == (128, 128, 128)
