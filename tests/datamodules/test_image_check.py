"""Missing images are reported when a split is read, before any batch: a missing image file or folder raises
``DataFileNotFoundError`` at ``dataset(stage)`` / ``setup`` saying how many of how many images are missing, with
examples and the annotation of each, the option that sets the image folder and a HINT; an image folder known from the
options alone is already reported by ``check_files``."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ecoflap_pl.datamodules import (
    COCOCaptionDataModule,
    DataFileNotFoundError,
    DataFormatError,
    EcoflapDataModule,
    Flickr30kDataModule,
    ImageNetDataModule,
    ImageTextPairsDataModule,
    NLVR2DataModule,
    VQAv2DataModule,
)
from ecoflap_pl.datamodules._io import check_image_files
from ecoflap_pl.datamodules.base import Stage
from tests.datamodules.datamodule_layouts import coco_image_path, collate, write_image, write_imagenet


@dataclass(frozen=True)
class Family:
    """A DataModule over tiny files of its official layout, and what its image check must say.

    Attributes:
        fixture: the fixture writing the layout (``None``: ImageNet with a flat val folder, written here).
        make: the DataModule over the layout's root.
        stage: the loop read.
        image: an image of that split, relative to the root.
        source: the start of the annotation that references ``image``, as the error names it (``{root}``: the root).
        total: distinct images of the split.
        option: the option that sets the image folder.
        hint: the error's HINT, given the root.
        folder: an image folder of the split, relative to the root, and whether ``check_files`` knows it (else it
            is found when the split is read).
        in_folder: images of the split in ``folder``.
    """

    fixture: str | None
    make: Callable[[Path], EcoflapDataModule]
    stage: Stage
    image: str
    source: str
    total: int
    option: str
    hint: Callable[[Path], str]
    folder: tuple[str, bool]
    in_folder: int


def _hint_relative(root: Path) -> str:
    return f"HINT: image paths in the annotation files are relative to `image_root` ({root})."


FAMILIES = {
    "coco_karpathy": Family(
        "coco_karpathy",
        lambda root: COCOCaptionDataModule(root, collate_fn=collate),
        "train",
        coco_image_path(2),
        "image_id 2 (",
        4,
        "image_root",
        _hint_relative,
        ("val2014", False),  # Karpathy paths name their folders: known once the file is read
        1,
    ),
    "coco_original": Family(
        "coco_original",
        lambda root: COCOCaptionDataModule(root, collate_fn=collate),
        "train",
        coco_image_path(3),
        "image_id 3 (",
        4,
        "image_root",
        _hint_relative,
        ("train2014", False),
        3,
    ),
    "coco_official": Family(
        "coco_official",
        lambda root: COCOCaptionDataModule(root, collate_fn=collate, test_split="val"),
        "test",
        coco_image_path(5),
        "image_id 5 (annotation id 500 in ",
        3,
        "image_root",
        _hint_relative,
        ("val2014", True),  # named by captions_val2014.json
        3,
    ),
    "flickr30k_karpathy": Family(
        "flickr_karpathy",
        lambda root: Flickr30kDataModule(root, collate_fn=collate),
        "train",
        "flickr30k-images/10002456.jpg",
        "image_id 10002456 (",
        2,
        "image_root",
        _hint_relative,
        ("flickr30k-images", False),
        2,
    ),
    "flickr30k_original": Family(
        "flickr_original",
        lambda root: Flickr30kDataModule(root, collate_fn=collate),
        "test",
        "flickr30k-images/1000344755.jpg",
        "image_id 1000344755 (",
        1,
        "image_root",
        _hint_relative,
        ("flickr30k-images", False),
        1,
    ),
    "vqa": Family(
        "vqa_root",
        lambda root: VQAv2DataModule(root, collate_fn=collate),
        "val",
        "val2014/COCO_val2014_000000000005.jpg",
        "question_id 50 (",
        2,
        "image_root",
        lambda root: f"HINT: images are read from `image_root`/val2014 ({root / 'val2014'}).",
        ("val2014", True),
        2,
    ),
    "nlvr2": Family(
        "nlvr2_root",
        lambda root: NLVR2DataModule(root, collate_fn=collate),
        "train",
        "train/7/train-11-2-img1.png",
        "identifier 'train-11-2-0' (",
        4,
        "image_root",
        lambda root: f"HINT: images are read from `image_root`/train ({root / 'train'}).",
        ("train/3", False),  # the `directory` sub-folders are named by the annotation lines
        2,
    ),
    "imagenet_flat_val": Family(
        None,
        lambda root: ImageNetDataModule(root, collate_fn=collate),
        "val",
        "val/ILSVRC2012_val_00000003.JPEG",
        "ImageId ILSVRC2012_val_00000003 (",
        4,
        "val_dir",
        lambda root: f"HINT: images are read from `val_dir` ({root / 'val'}).",
        ("val", True),
        4,
    ),
    "image_text_pairs": Family(
        "pairs_root",
        lambda root: ImageTextPairsDataModule(root, "cc3m.json", collate_fn=collate),
        "train",
        "images/00002/000000009.jpg",
        "{root}/cc3m.json, entry 9)",
        10,
        "image_root",
        lambda root: f"HINT: image paths are relative to `image_root` ({root}).",
        ("images/00001", False),
        4,
    ),
}
TRAINER_STAGE = {"train": "fit", "val": "validate", "test": "test"}


def _root(family: Family, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    if family.fixture is None:
        return write_imagenet(tmp_path, flat_val=True)
    return request.getfixturevalue(family.fixture)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_missing_image_file_is_reported_when_the_split_is_read(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    family = FAMILIES[name]
    root = _root(family, tmp_path, request)
    (root / family.image).unlink()
    datamodule = family.make(root)
    datamodule.check_files(family.stage)  # names only: the file is not looked for before the split is read
    reads = (lambda: datamodule.dataset(family.stage), lambda: family.make(root).setup(TRAINER_STAGE[family.stage]))
    for read in reads:
        with pytest.raises(DataFileNotFoundError) as raised:
            read()
        lines = str(raised.value).splitlines()
        assert lines[0] == (
            f"Missing images: 1 of the {family.total} that the annotations name (image folder set by "
            f"`{family.option}`), e.g.:"
        ), raised.value
        assert lines[1].startswith(f"  {root / family.image} (for {family.source.format(root=root)}"), raised.value
        assert lines[2] == family.hint(root) and len(lines) == 3, raised.value


@pytest.mark.parametrize("name", FAMILIES)
def test_a_missing_image_folder_is_named_once(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    family = FAMILIES[name]
    root = _root(family, tmp_path, request)
    folder, known_from_options = family.folder
    shutil.rmtree(root / folder)
    datamodule = family.make(root)
    if known_from_options:
        with pytest.raises(DataFileNotFoundError) as raised:
            datamodule.check_files(family.stage)
        if name.startswith("imagenet"):  # the split folder is the option's value itself
            expected = f"ImageNet val folder not found: expected the directory {root / folder}. HINT: set `val_dir`"
            assert str(raised.value).startswith(expected), raised.value
        else:
            assert str(raised.value) == (
                f"Image folder {root / folder} (set by `{family.option}`) does not exist. {family.hint(root)}"
            )
        with pytest.raises(DataFileNotFoundError, match=re.escape(str(raised.value))):
            datamodule.dataset(family.stage)  # reading the split starts with the same lookup
        return
    datamodule.check_files(family.stage)
    with pytest.raises(DataFileNotFoundError) as raised:
        datamodule.setup(TRAINER_STAGE[family.stage])
    assert str(raised.value).splitlines() == [
        f"Image folder {root / folder} (set by `{family.option}`) does not exist (it should hold {family.in_folder} "
        f"of the {family.total} images).",
        family.hint(root),
    ]


def test_a_wrong_image_root_is_named_before_the_split_is_read(
    pairs_root: Path, coco_karpathy: Path, nlvr2_root: Path, vqa_root: Path
) -> None:
    # The four layouts share one folder; `image_root` names a folder that is not there (nor is its parent).
    stages: list[tuple[EcoflapDataModule, Stage]] = [
        (ImageTextPairsDataModule(pairs_root, "cc3m.json", image_root="no/such"), "train"),
        (COCOCaptionDataModule(coco_karpathy, image_root="no/such"), "val"),
        (NLVR2DataModule(nlvr2_root, image_root="no/such"), "train"),
        (VQAv2DataModule(vqa_root, image_root="no/such"), "test"),
    ]
    for datamodule, stage in stages:
        with pytest.raises(DataFileNotFoundError) as raised:
            datamodule.check_files(stage)
        message = str(raised.value)
        assert message.startswith(
            f"Image folder {datamodule.data_dir / 'no'} (set by `image_root`) does not exist. "
        ), message
        assert len(message.splitlines()) == 1


def test_many_missing_files_are_counted_with_three_examples(pairs_root: Path) -> None:
    removed = [pairs_root / "images" / "00000" / f"{i:09d}.jpg" for i in (0, 1, 3)]
    removed += [pairs_root / "images" / "00002" / f"{i:09d}.jpg" for i in (8, 9)]
    for image in removed:
        image.unlink()
    with pytest.raises(DataFileNotFoundError) as raised:
        ImageTextPairsDataModule(pairs_root, "cc3m.json").dataset("train")
    lines = str(raised.value).splitlines()
    assert lines[0] == "Missing images: 5 of the 10 that the annotations name (image folder set by `image_root`), e.g.:"
    assert lines[1:4] == [
        f"  {image} (for {pairs_root / 'cc3m.json'}, entry {i})"
        for image, i in zip(removed[:3], (0, 1, 3), strict=True)
    ]
    assert lines[4].startswith("HINT: ") and len(lines) == 5


def test_missing_folders_and_files_are_reported_together(pairs_root: Path, coco_karpathy: Path) -> None:
    shutil.rmtree(pairs_root / "images" / "00000")
    (pairs_root / "images" / "00002" / "000000009.jpg").unlink()
    with pytest.raises(DataFileNotFoundError) as raised:
        ImageTextPairsDataModule(pairs_root, "cc3m.json").dataset("train")
    lines = str(raised.value).splitlines()
    assert lines[:3] == [
        f"Image folder {pairs_root / 'images' / '00000'} (set by `image_root`) does not exist (it should hold 4 of "
        "the 10 images).",
        "Missing images: 1 of the 10 that the annotations name (image folder set by `image_root`), e.g.:",
        f"  {pairs_root / 'images' / '00002' / '000000009.jpg'} (for {pairs_root / 'cc3m.json'}, entry 9)",
    ]
    # Karpathy's training split spans two COCO folders: both missing are named on one line. (The two fixtures share
    # one folder: the pairs' images/ would be taken for LAVIS's COCO image folder.)
    shutil.rmtree(pairs_root / "images")
    shutil.rmtree(coco_karpathy / "train2014")
    shutil.rmtree(coco_karpathy / "val2014")
    with pytest.raises(DataFileNotFoundError) as raised:
        COCOCaptionDataModule(coco_karpathy).dataset("train")
    assert str(raised.value).splitlines()[0] == (
        f"Image folders {coco_karpathy / 'train2014'}, {coco_karpathy / 'val2014'} (set by `image_root`) do not "
        "exist (they should hold 4 of the 4 images)."
    )


def _message(images: list[tuple[str, str]]) -> str:
    with pytest.raises(DataFileNotFoundError) as raised:
        check_image_files(images, "opt", "fix it")
    return str(raised.value)


def test_the_first_missing_folder_on_the_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = [(str(tmp_path / "a" / "b" / f"c{i}" / "x.jpg"), f"entry {i}") for i in range(3)]
    assert _message(deep) == (
        f"Image folder {tmp_path / 'a'} (set by `opt`) does not exist (it should hold 3 of the 3 images).\nHINT: fix it"
    )
    (tmp_path / "a").write_text("a file where a folder should be")
    assert _message(deep).startswith(f"Image folder {tmp_path / 'a'} (set by `opt`) is not a folder (it should")
    monkeypatch.chdir(tmp_path)  # paths relative to the working directory (a relative `data_dir`)
    write_image(tmp_path / "here.jpg")
    check_image_files([("here.jpg", "entry 0")], "opt", "fix it")
    assert _message([("here.jpg", "entry 0"), ("gone.jpg", "entry 1"), ("here.jpg", "entry 2")]).splitlines() == [
        "Missing images: 1 of the 2 that the annotations name (image folder set by `opt`), e.g.:",
        "  gone.jpg (for entry 1)",
        "HINT: fix it",
    ]


def test_an_unreadable_image_is_still_found_when_its_sample_is_read(vqa_root: Path) -> None:
    # Only existence is checked up front: decoding every image would take minutes on a real split.
    image = vqa_root / "val2014" / "COCO_val2014_000000000005.jpg"
    image.write_bytes(b"not a jpeg")
    dataset = VQAv2DataModule(vqa_root, collate_fn=collate).dataset("val")
    with pytest.raises(DataFormatError, match=rf"Image {image} \(for question_id 50 .*cannot be read"):
        dataset[1]
