"""Flickr30kDataModule over LAVIS flickr30k_{train,val,test}.json and Karpathy's dataset_flickr30k.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError, Flickr30kDataModule
from tests.datamodules.datamodule_layouts import FLICKR_IMAGES, captions_of, collate


def _split_ids(split: str) -> list[int]:
    return [i for i, s in FLICKR_IMAGES.items() if s == split]


@pytest.mark.parametrize("fixture", ["flickr_karpathy", "flickr_original"])
def test_every_split(fixture: str, request) -> None:
    root = request.getfixturevalue(fixture)
    dm = Flickr30kDataModule(root, collate_fn=collate)
    train = dm.dataset("train")
    assert len(train) == 3 * len(_split_ids("train"))
    first = train[0]
    assert set(first) == {"image", "image_id", "text"}
    assert first["image_id"] == _split_ids("train")[0] and first["text"] == captions_of(first["image_id"])[0]
    assert Path(train.samples[0].images[0]) == root / "flickr30k-images" / f"{first['image_id']}.jpg"
    for stage in ("val", "test"):
        sample = dm.dataset(stage)[0]
        assert set(sample) == {"image", "image_id", "references"}
        assert sample["image_id"] == _split_ids(stage)[0]
        assert sample["references"] == captions_of(sample["image_id"])
        assert sample["image"].mode == "RGB"


def test_lavis_storage_layout(flickr_karpathy: Path) -> None:
    # LAVIS's dataset builder stores the lists as annotations/{train,val,test}.json and the images in images/: the
    # files were not found ("Flickr30k train caption annotations ... not found"), nor, once named, the images.
    for split in ("train", "val", "test"):
        (flickr_karpathy / "annotations" / f"flickr30k_{split}.json").rename(
            flickr_karpathy / "annotations" / f"{split}.json"
        )
    (flickr_karpathy / "images").mkdir()
    (flickr_karpathy / "flickr30k-images").rename(flickr_karpathy / "images" / "flickr30k-images")
    dm = Flickr30kDataModule(flickr_karpathy, collate_fn=collate)
    assert dm.check_files("test")["test_file"] == flickr_karpathy / "annotations" / "test.json"
    sample = dm.dataset("test")[0]
    assert sample["image_id"] == _split_ids("test")[0] and sample["references"] == captions_of(sample["image_id"])
    assert Path(dm.dataset("test").samples[0].images[0]).parent == flickr_karpathy / "images" / "flickr30k-images"
    assert len(dm.dataset("train")) == 3 * len(_split_ids("train"))


def test_official_format_is_not_offered(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`annotation_format` must be one of 'auto', 'karpathy', 'karpathy_original'"):
        Flickr30kDataModule(tmp_path, annotation_format="official")


def test_missing_files_list_flickr_names(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=r"flickr30k_test\.json.*dataset_flickr30k\.json.*`test_file`"):
        Flickr30kDataModule(tmp_path).dataset("test")


def test_bad_split_label_in_original(flickr_original: Path) -> None:
    path = flickr_original / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    data["images"][2]["split"] = "dev"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"images\[2\]: 'split' must be train, restval, val or test, got 'dev'"):
        Flickr30kDataModule(flickr_original).dataset("val")


def test_caption_of_wrong_type(flickr_karpathy: Path) -> None:
    path = flickr_karpathy / "annotations" / "flickr30k_val.json"
    path.write_text(json.dumps([{"image": "flickr30k-images/1000268201.jpg", "caption": 5}]))
    with pytest.raises(DataFormatError, match=r"entry 0: 'caption' must be a string or a list of strings"):
        Flickr30kDataModule(flickr_karpathy).dataset("val")


def test_missing_image(flickr_original: Path) -> None:
    image = flickr_original / "flickr30k-images" / "1000344755.jpg"
    dataset = Flickr30kDataModule(flickr_original).dataset("test")
    image.unlink()  # after the split was read (test_image_check.py: before): found when its sample is read
    with pytest.raises(DataFileNotFoundError, match=rf"{image} \(for image_id 1000344755 "):
        dataset[0]
