"""COCOCaptionDataModule over the Karpathy (LAVIS), Karpathy original and official caption files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ecoflap_pl.datamodules import COCOCaptionDataModule, DataFileNotFoundError, DataFormatError
from ecoflap_pl.datamodules.base import Stage
from tests.datamodules.datamodule_layouts import (
    COCO_IMAGES,
    KARPATHY_SPLIT,
    captions_of,
    coco_image_path,
    collate,
    edit_json,
    write_coco_images,
    write_coco_official,
    write_image,
)


def _module(root: Path, **kwargs) -> COCOCaptionDataModule:
    return COCOCaptionDataModule(root, collate_fn=collate, batch_size=2, **kwargs)


def _ids(dataset) -> list[int]:
    return [dataset.samples[i].fields["image_id"] for i in range(len(dataset))]


KARPATHY_EXPECTED = {
    "train": [1, 2, 3, 4],  # restval (4) counts as train
    "val": [5],
    "test": [6],
}


@pytest.mark.parametrize("fixture", ["coco_karpathy", "coco_original"])
@pytest.mark.parametrize("annotation_format", ["auto", "explicit"])
def test_karpathy_formats_read_every_split(fixture: str, annotation_format: str, request) -> None:
    root = request.getfixturevalue(fixture)
    fmt = {"coco_karpathy": "karpathy", "coco_original": "karpathy_original"}[fixture]
    dm = _module(root, annotation_format="auto" if annotation_format == "auto" else fmt)

    train = dm.dataset("train")
    assert len(train) == 3 * len(KARPATHY_EXPECTED["train"])
    sample = train[0]
    assert set(sample) == {"image", "image_id", "text"}
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert sample["image"].size == (8, 8)
    assert (sample["image_id"], sample["text"]) == (1, captions_of(1)[0])
    assert sorted(set(_ids(train))) == KARPATHY_EXPECTED["train"]

    for stage in ("val", "test"):
        dataset = dm.dataset(stage)
        assert _ids(dataset) == KARPATHY_EXPECTED[stage]
        sample = dataset[0]
        assert set(sample) == {"image", "image_id", "references"}
        assert sample["references"] == captions_of(KARPATHY_EXPECTED[stage][0])
        assert sample["image"].getpixel((0, 0))[0] == pytest.approx(KARPATHY_EXPECTED[stage][0], abs=3)


def test_official_2014_reads_train_and_val(coco_official: Path) -> None:
    dm = _module(coco_official, annotation_format="official", test_split="val")
    train = dm.dataset("train")
    assert len(train) == 9 and sorted(set(_ids(train))) == [1, 2, 3]
    val = dm.dataset("val")
    assert _ids(val) == [4, 5, 6]  # the image without captions (999) is left out
    sample = val[1]
    assert sample["references"] == captions_of(5)
    assert dm.dataset("test").samples == val.samples
    assert Path(val.samples[0].images[0]) == coco_official / coco_image_path(4)


def test_official_2017_names_and_auto_detection(tmp_path: Path) -> None:
    write_coco_images(tmp_path, year=2017)
    write_coco_official(tmp_path, year=2017)
    dm = _module(tmp_path, val_split="val")
    val = dm.dataset("val")
    assert Path(val.samples[0].images[0]) == tmp_path / "val2017" / "000000000004.jpg"
    assert val[0]["image_id"] == 4


def test_official_folder_from_coco_url_when_renamed(coco_official: Path) -> None:
    renamed = coco_official / "my_val.json"
    renamed.write_text((coco_official / "annotations" / "captions_val2014.json").read_text())
    dm = _module(coco_official, val_file="my_val.json")
    assert dm.dataset("val")[0]["references"] == captions_of(4)


def test_official_has_no_test_split(coco_official: Path) -> None:
    dm = _module(coco_official, annotation_format="official")
    with pytest.raises(ValueError, match="no test split.*test_split: val"):
        dm.dataset("test")


@pytest.mark.parametrize(("stage", "option"), [("test", "test_split"), ("val", "val_split")])
def test_only_official_files_and_the_test_split_say_how_to_evaluate(
    coco_official: Path, stage: Stage, option: str
) -> None:
    # `auto` with the official release only: the test split (the default test_split) has no file. The error said to
    # set `test_file`, as if a file were misplaced, where the official captions have no test split at all.
    dm = _module(coco_official, val_split="test")
    official = coco_official / "annotations" / "captions_val2014.json"
    expected = rf"have no test split\. HINT: set `{option}: val` to evaluate on captions_val2014\.json"
    with pytest.raises(
        DataFileNotFoundError, match=rf"coco_karpathy_test\.json.* {re.escape(str(official))}, {expected}"
    ):
        dm.check_files(stage)
    assert _ids(_module(coco_official, **{option: "val"}).dataset(stage)) == [4, 5, 6]


def test_lavis_storage_layout_reads_images_from_the_images_folder(coco_karpathy: Path) -> None:
    # LAVIS stores coco/annotations/coco_karpathy_*.json and the images in coco/images/{train2014,val2014}/: the lists
    # were found, the images looked for in coco/val2014 ("Image folder ... does not exist").
    (coco_karpathy / "images").mkdir()
    for folder in ("train2014", "val2014"):
        (coco_karpathy / folder).rename(coco_karpathy / "images" / folder)
    val = _module(coco_karpathy).dataset("val")
    assert _ids(val) == KARPATHY_EXPECTED["val"]
    assert Path(val.samples[0].images[0]) == coco_karpathy / "images" / coco_image_path(5)
    assert val[0]["image"].getpixel((0, 0))[0] == pytest.approx(5, abs=3)


def test_auto_detection_prefers_karpathy(coco_karpathy: Path) -> None:
    write_coco_official(coco_karpathy)
    assert _ids(_module(coco_karpathy).dataset("val")) == [5]


def test_nothing_found_lists_every_path(tmp_path: Path) -> None:
    dm = _module(tmp_path)
    with pytest.raises(DataFileNotFoundError) as err:
        dm.dataset("train")
    message = str(err.value)
    for name in ("coco_karpathy_train.json", "dataset_coco.json", "captions_train2017.json", "captions_train2014.json"):
        assert name in message
    assert str(tmp_path / "annotations" / "coco_karpathy_train.json") in message
    assert "`train_file`" in message


def test_missing_override_names_path_and_option(coco_karpathy: Path) -> None:
    dm = _module(coco_karpathy, test_file="elsewhere/test.json")
    with pytest.raises(DataFileNotFoundError, match=r"elsewhere/test\.json.*`test_file`"):
        dm.dataset("test")


def test_format_mismatch(coco_karpathy: Path) -> None:
    dm = _module(coco_karpathy, annotation_format="official", train_file="annotations/coco_karpathy_train.json")
    with pytest.raises(DataFormatError, match="'karpathy' format.*`annotation_format` is 'official'"):
        dm.dataset("train")


def test_unknown_structure(coco_karpathy: Path) -> None:
    (coco_karpathy / "odd.json").write_text(json.dumps({"something": []}))
    with pytest.raises(DataFormatError, match=r"odd\.json.*not a COCO caption file"):
        _module(coco_karpathy, train_file="odd.json").dataset("train")


def test_corrupt_json(coco_karpathy: Path) -> None:
    path = coco_karpathy / "annotations" / "coco_karpathy_val.json"
    path.write_text('[{"image": "x.jpg", ')
    with pytest.raises(DataFormatError, match=rf"{path}.*`val_file`.*not valid JSON"):
        _module(coco_karpathy).dataset("val")


def test_missing_key_names_file_entry_and_key(coco_karpathy: Path) -> None:
    path = coco_karpathy / "annotations" / "coco_karpathy_train.json"
    entries = json.loads(path.read_text())
    del entries[1]["caption"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataFormatError, match=rf"{path}, entry 1: missing key 'caption'"):
        _module(coco_karpathy).dataset("train")


@pytest.mark.parametrize(
    ("split", "change", "message"),
    [
        (
            "train",
            lambda data: data["annotations"][2].pop("image_id"),
            r"{path}, annotations\[2\]: missing key 'image_id'",
        ),
        (
            "val",
            lambda data: data["annotations"][0].update(image_id=12345),
            r"annotation id 400\): image_id 12345 is not in 'images'",
        ),
    ],
    ids=["missing key", "unknown image"],
)
def test_malformed_official_annotation(
    coco_official: Path, split: Stage, change: Callable[[Any], object], message: str
) -> None:
    path = edit_json(coco_official / "annotations" / f"captions_{split}2014.json", change)
    with pytest.raises(DataFormatError, match=message.format(path=path)):
        _module(coco_official).dataset(split)


def test_missing_key_in_original(coco_original: Path) -> None:
    path = coco_original / "dataset_coco.json"
    data = json.loads(path.read_text())
    del data["images"][0]["sentences"][1]["raw"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"images\[0\], sentences\[1\]: missing key 'raw'"):
        _module(coco_original).dataset("train")


def test_missing_image_names_path_and_id(coco_karpathy: Path) -> None:
    image = coco_karpathy / coco_image_path(5)
    dataset = _module(coco_karpathy).dataset("val")
    image.unlink()  # after the split was read (test_image_check.py: before): found when its sample is read
    with pytest.raises(DataFileNotFoundError, match=rf"{image} \(for image_id 5 .*`image_root`"):
        dataset[0]


def test_corrupt_image_names_path_and_id(coco_official: Path) -> None:
    image = coco_official / coco_image_path(2)
    image.write_bytes(b"not a jpeg")
    dataset = _module(coco_official).dataset("train")
    with pytest.raises(DataFormatError, match=rf"{image} \(for image_id 2 \(annotation id 200 .*cannot be read"):
        dataset[3]


def test_truncated_image_is_reported(coco_karpathy: Path) -> None:
    image = coco_karpathy / coco_image_path(6)
    write_image(image, 6)
    image.write_bytes(image.read_bytes()[:40])
    with pytest.raises(DataFormatError, match="image_id 6"):
        _module(coco_karpathy).dataset("test")[0]


def test_image_root_option(coco_karpathy: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("images")
    for image_id in COCO_IMAGES:
        write_image(elsewhere / coco_image_path(image_id), 200)
    dataset = _module(coco_karpathy, image_root=str(elsewhere)).dataset("val")
    assert dataset[0]["image"].getpixel((0, 0))[0] == pytest.approx(200, abs=3)


def test_val_split_can_be_test(coco_karpathy: Path) -> None:
    dm = _module(coco_karpathy, val_split="test")
    assert _ids(dm.dataset("val")) == [i for i, s in KARPATHY_SPLIT.items() if s == "test"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"annotation_format": "lavis"}, "`annotation_format` must be one of 'auto', 'karpathy'"),
        ({"val_split": "dev"}, "`val_split` must be one of 'train', 'val', 'test', got 'dev'"),
        ({"batch_size": 0}, "`batch_size` must be an int >= 1, got 0"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        COCOCaptionDataModule(tmp_path, **kwargs)


def test_dataloaders_with_simple_collate(coco_karpathy: Path) -> None:
    dm = _module(coco_karpathy)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and {"image", "image_id", "text"} == set(batch[0])
    assert [len(b) for b in dm.val_dataloader()] == [1]
    assert [len(b) for b in dm.test_dataloader()] == [1]
    assert [len(b) for b in dm.predict_dataloader()] == [1]


def test_setup_reads_only_what_the_stage_needs(coco_karpathy: Path) -> None:
    (coco_karpathy / "annotations" / "coco_karpathy_train.json").unlink()
    dm = _module(coco_karpathy)
    dm.setup("validate")
    dm.setup("test")
    with pytest.raises(DataFileNotFoundError, match="`train_file`"):
        dm.setup("fit")
