"""ImageNetDataModule over per-wnid folders and the flat val folder with Kaggle's LOC_val_solution.csv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError, ImageNetDataModule
from tests.datamodules.datamodule_layouts import IMAGENET_WNIDS, collate, write_image, write_imagenet


@pytest.mark.parametrize("flat_val", [False, True])
def test_train_and_val_layouts(tmp_path: Path, flat_val: bool) -> None:
    write_imagenet(tmp_path, flat_val=flat_val)
    dm = ImageNetDataModule(tmp_path, collate_fn=collate)
    assert dm.classes == list(IMAGENET_WNIDS)
    assert dm.dataset("val")[0]["label"] == 0 and dm.class_names == ["tench", "goldfish"]
    train = dm.dataset("train")
    assert [train[i]["label"] for i in range(len(train))] == [0, 0, 0, 1, 1, 1]
    sample = train[4]
    assert set(sample) == {"image", "label", "image_id"} and sample["image"].mode == "RGB"
    assert sample["image_id"] == f"{IMAGENET_WNIDS[1]}/{IMAGENET_WNIDS[1]}_1.JPEG"  # the path in the split folder
    assert sample["image"].getpixel((0, 0))[0] == pytest.approx(11, abs=3)
    val = dm.dataset("val")
    labels = sorted(val[i]["label"] for i in range(len(val)))
    assert labels == [0, 0, 1, 1]
    assert dm.dataset("test").samples == val.samples
    if flat_val:  # sorted by ImageId; image k has label k % 2
        assert [val[i]["label"] for i in range(len(val))] == [0, 1, 0, 1]
        assert Path(val.samples[0].images[0]) == tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"
    image_ids = [val[i]["image_id"] for i in range(len(val))]
    assert len(set(image_ids)) == len(val)  # evaluation counts a repeated image_id once: each names one sample
    assert (
        image_ids[0] == "ILSVRC2012_val_00000001.JPEG"
        if flat_val
        else f"{IMAGENET_WNIDS[0]}/ILSVRC2012_val_00000001.JPEG"
    )


def test_kaggle_layout_finds_csv_three_levels_up(tmp_path: Path) -> None:
    write_imagenet(tmp_path, flat_val=True)
    data_dir = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    data_dir.mkdir(parents=True)
    for name in ("train", "val"):
        (tmp_path / name).rename(data_dir / name)
    assert len(ImageNetDataModule(data_dir).dataset("val")) == 4


def test_classes_from_csv_when_only_a_flat_val(tmp_path: Path) -> None:
    write_imagenet(tmp_path, flat_val=True)
    for wnid in IMAGENET_WNIDS:
        for image in (tmp_path / "train" / wnid).iterdir():
            image.unlink()
        (tmp_path / "train" / wnid).rmdir()
    (tmp_path / "train").rmdir()
    dm = ImageNetDataModule(tmp_path)
    assert dm.classes == list(IMAGENET_WNIDS)
    assert len(dm.dataset("val")) == 4
    with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path / 'train'}.*`train_dir`"):
        dm.calibration_dataloader()


def test_other_wnids_keep_their_names(tmp_path: Path) -> None:
    write_imagenet(tmp_path, wnids=("cat", "dog"))
    assert ImageNetDataModule(tmp_path).class_names == ["cat", "dog"]


@pytest.mark.parametrize("kind", ["json_dict", "json_list", "text"])
def test_class_names_file(tmp_path: Path, kind: str) -> None:
    write_imagenet(tmp_path)
    names = {"json_dict": {"n01443537": "gold fish", "n01440764": "a tench"}, "json_list": ["a tench", "gold fish"]}
    path = tmp_path / ("names.txt" if kind == "text" else "names.json")
    path.write_text("a tench\n\ngold fish\n" if kind == "text" else json.dumps(names[kind]))
    assert ImageNetDataModule(tmp_path, class_names_file=path.name).class_names == ["a tench", "gold fish"]


def test_kaggle_synset_mapping_gives_each_wnid_its_first_synonym(tmp_path: Path) -> None:
    # Kaggle's LOC_synset_mapping.txt: read as one name per line, each name kept its wnid ("n01440764 tench, Tinca
    # tinca"), and a file listing more classes than the folders hold (all 1000 for a subset) was refused.
    write_imagenet(tmp_path, flat_val=True)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    synsets = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01484850 great white shark"]
    for lines in (synsets[:2], synsets):
        mapping.write_text("\n".join(lines) + "\n")
        dm = ImageNetDataModule(tmp_path, class_names_file=mapping.name, collate_fn=collate)
        assert dm.dataset("val")[0]["label"] == 0 and dm.class_names == ["tench", "goldfish"]
    mapping.write_text(synsets[1] + "\n")
    with pytest.raises(
        DataFormatError, match=r"LOC_synset_mapping\.txt \(set by `class_names_file`\) has no name for "
    ):
        _ = ImageNetDataModule(tmp_path, class_names_file=mapping.name).class_names


def test_class_names_file_errors(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    (tmp_path / "names.txt").write_text("only one\n")
    with pytest.raises(DataFormatError, match=r"names\.txt \(set by `class_names_file`\) must hold 2 string names"):
        _ = ImageNetDataModule(tmp_path, class_names_file="names.txt").class_names
    (tmp_path / "names.json").write_text(json.dumps({"n01440764": "tench"}))
    with pytest.raises(DataFormatError, match=r"has no name for \['n01443537'\]"):
        _ = ImageNetDataModule(tmp_path, class_names_file="names.json").class_names
    with pytest.raises(DataFileNotFoundError, match=r"missing\.txt.*`class_names_file`"):
        _ = ImageNetDataModule(tmp_path, class_names_file="missing.txt").class_names


def test_missing_folders_name_path_and_option(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path / 'train'} \(set by `train_dir`\)"):
        _ = ImageNetDataModule(tmp_path).classes
    write_imagenet(tmp_path)
    with pytest.raises(DataFileNotFoundError, match=rf"directory {tmp_path / 'elsewhere'}.*`val_dir`"):
        ImageNetDataModule(tmp_path, val_dir="elsewhere").dataset("val")


def test_missing_csv_names_path_and_option(tmp_path: Path) -> None:
    write_imagenet(tmp_path, flat_val=True)
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path / 'LOC_val_solution.csv'}.*`val_solution_file`"):
        ImageNetDataModule(tmp_path).dataset("val")


def test_csv_errors(tmp_path: Path) -> None:
    write_imagenet(tmp_path, flat_val=True)
    path = tmp_path / "LOC_val_solution.csv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[1:]))
    with pytest.raises(DataFormatError, match="must start with the header 'ImageId,PredictionString'"):
        ImageNetDataModule(tmp_path).dataset("val")
    path.write_text("\n".join([*rows, "ILSVRC2012_val_00000009,n99999999 1 2 3 4"]))
    with pytest.raises(DataFormatError, match=r"line 6: wnid 'n99999999' of ILSVRC2012_val_00000009 is not a known"):
        ImageNetDataModule(tmp_path).dataset("val")
    path.write_text("\n".join([*rows, "ILSVRC2012_val_00000009,"]))
    with pytest.raises(DataFormatError, match=r"line 6: expected 'ImageId,wnid' or 'ImageId,wnid x_min y_min x_max"):
        ImageNetDataModule(tmp_path).dataset("val")


def test_csv_listing_an_image_twice_is_refused(tmp_path: Path) -> None:
    # evaluated twice on one device, once under DDP (a repeated image_id is a padding repeat): refused instead
    write_imagenet(tmp_path, flat_val=True)
    path = tmp_path / "LOC_val_solution.csv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([*rows, rows[2]]) + "\n")
    expected = r"lists ImageId ILSVRC2012_val_00000002 twice \(lines 3 and 6\): its image would be evaluated twice\."
    with pytest.raises(DataFormatError, match=expected + ".*HINT: the file is probably damaged"):
        ImageNetDataModule(tmp_path).dataset("val")


def test_unknown_val_folder(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    write_image(tmp_path / "val" / "n00000001" / "x.JPEG")
    with pytest.raises(DataFormatError, match=r"n00000001 \(under `val_dir`\) is not one of the 2 classes"):
        ImageNetDataModule(tmp_path).dataset("val")


def test_missing_and_corrupt_images(tmp_path: Path) -> None:
    write_imagenet(tmp_path, flat_val=True)
    dataset = ImageNetDataModule(tmp_path).dataset("val")
    missing = tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG"
    missing.unlink()
    with pytest.raises(DataFileNotFoundError, match=rf"{missing} \(for ImageId ILSVRC2012_val_00000002 .*line 3"):
        dataset[1]
    corrupt = tmp_path / "train" / "n01443537" / "n01443537_0.JPEG"
    corrupt.write_bytes(b"JFIF?")
    with pytest.raises(DataFormatError, match=rf"{corrupt} \(for class n01443537 \(label 1\)\)"):
        ImageNetDataModule(tmp_path).dataset("train")[3]
