"""``EcoflapDataModule.check_files``: the files of a loop's split are found without being read, and a missing one is
named with the option that sets it, by the same lookup that reading the split does."""

from __future__ import annotations

import re
from collections.abc import Callable
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
    TextDataModule,
    VQAv2DataModule,
)
from ecoflap_pl.demo.training import VQACaptionMixDataModule
from tests.datamodules.datamodule_layouts import collate, write_imagenet, write_json, write_vqa

VQA_VAL = {
    "val_questions_file": "v2_OpenEnded_mscoco_val2014_questions.json",
    "val_annotations_file": "v2_mscoco_val2014_annotations.json",
}


def _text_root(root: Path) -> Path:
    (root / "wiki.train.raw").write_text("first paragraph\n\nsecond\n", encoding="utf-8")
    (root / "c4.valid.jsonl").write_text('{"text": "held out"}\n', encoding="utf-8")
    return root


def _imagenet_root(root: Path) -> Path:
    write_imagenet(root, flat_val=True)
    write_json(root / "names.json", ["tench", "goldfish"])
    return root


def datamodule_case(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[EcoflapDataModule, str, dict[str, str]]:
    """A DataModule over tiny files of its official layout, the loop checked, and the files it must find (by
    option, relative to ``data_dir``)."""
    makers: dict[str, Callable[[], tuple[EcoflapDataModule, str, dict[str, str]]]] = {
        "vqa_val": lambda: (VQAv2DataModule(request.getfixturevalue("vqa_root")), "val", VQA_VAL),
        "vqa_test_unannotated": lambda: (
            VQAv2DataModule(request.getfixturevalue("vqa_root"), test_split="test-dev2015"),
            "test",
            {"test_questions_file": "v2_OpenEnded_mscoco_test-dev2015_questions.json"},
        ),
        "coco_karpathy": lambda: (
            COCOCaptionDataModule(request.getfixturevalue("coco_karpathy")),
            "test",
            {"test_file": "annotations/coco_karpathy_test.json"},
        ),
        "coco_original": lambda: (
            COCOCaptionDataModule(request.getfixturevalue("coco_original")),
            "train",
            {"train_file": "dataset_coco.json"},
        ),
        "coco_official": lambda: (
            COCOCaptionDataModule(request.getfixturevalue("coco_official"), test_split="val"),
            "test",
            {"test_file": "annotations/captions_val2014.json"},
        ),
        "flickr30k": lambda: (
            Flickr30kDataModule(request.getfixturevalue("flickr_karpathy")),
            "val",
            {"val_file": "annotations/flickr30k_val.json"},
        ),
        "nlvr2": lambda: (NLVR2DataModule(request.getfixturevalue("nlvr2_root")), "val", {"val_file": "dev.json"}),
        "imagenet_flat_val": lambda: (
            ImageNetDataModule(_imagenet_root(tmp_path), class_names_file="names.json"),
            "val",
            {"val_dir": "val", "val_solution_file": "LOC_val_solution.csv", "class_names_file": "names.json"},
        ),
        "text": lambda: (
            TextDataModule(_text_root(tmp_path), train_file="wiki.train.raw", val_file="c4.valid.jsonl"),
            "val",
            {"val_file": "c4.valid.jsonl"},
        ),
        "image_text_pairs": lambda: (
            ImageTextPairsDataModule(request.getfixturevalue("pairs_root"), "cc3m.json"),
            "train",
            {"train_file": "cc3m.json"},
        ),
    }
    return makers[name]()


CASES = [
    "vqa_val",
    "vqa_test_unannotated",
    "coco_karpathy",
    "coco_original",
    "coco_official",
    "flickr30k",
    "nlvr2",
    "imagenet_flat_val",
    "text",
    "image_text_pairs",
]


# The image folder each case's `_locate` knows from the options alone (returned as "image_root"), under data_dir.
IMAGE_FOLDERS = {
    "vqa_val": "val2014",
    "vqa_test_unannotated": "test2015",
    "coco_karpathy": "",
    "coco_original": "",
    "coco_official": "val2014",  # named by captions_val2014.json
    "flickr30k": "",
    "nlvr2": "dev",
    "image_text_pairs": "",
}


@pytest.mark.parametrize("name", CASES)
def test_finds_the_files_the_loop_reads(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    datamodule, stage, expected = datamodule_case(name, tmp_path, request)
    files = datamodule.check_files(stage)
    folders = {"image_root": IMAGE_FOLDERS[name]} if name in IMAGE_FOLDERS else {}
    assert files == {option: datamodule.data_dir / path for option, path in {**expected, **folders}.items()}
    assert len(datamodule.dataset(stage)) > 0  # and reading the split finds the same files


@pytest.mark.parametrize("name", CASES)
def test_a_missing_file_is_named_with_its_option(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    datamodule, stage, expected = datamodule_case(name, tmp_path, request)
    for option, path in expected.items():
        found = datamodule.check_files(stage)[option]
        moved = found.with_name(found.name + ".moved")
        found.rename(moved)
        with pytest.raises(DataFileNotFoundError, match=rf"{Path(path).name}.*HINT: set `{option}`") as raised:
            datamodule.check_files(stage)
        assert str(found) in str(raised.value), raised.value
        with pytest.raises(DataFileNotFoundError, match=rf"HINT: set `{option}`"):
            datamodule.dataset(stage)  # reading the split stops at the same lookup
        moved.rename(found)


@pytest.mark.parametrize("name", [case for case in CASES if not case.startswith("imagenet")])
def test_no_file_is_parsed(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    datamodule, stage, expected = datamodule_case(name, tmp_path, request)
    first = datamodule.data_dir / next(iter(expected.values()))
    first.write_text("{ not JSON", encoding="utf-8")
    assert datamodule.check_files(stage)[next(iter(expected))] == first  # found, not opened
    with pytest.raises(DataFormatError, match=re.escape(str(first))):
        datamodule.dataset(stage)


def test_a_missing_data_dir_names_the_data_dir_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "vqa"
    with pytest.raises(DataFileNotFoundError, match=rf"{missing / VQA_VAL['val_questions_file']}.*HINT"):
        VQAv2DataModule(missing).check_files("val")
    with pytest.raises(DataFileNotFoundError, match=rf"{missing / 'train'}.*`train_dir`"):
        ImageNetDataModule(missing).check_files("train")
    # The folder, not the file, is what to fix (an experiment file whose `# EDIT` line was not edited).
    with pytest.raises(DataFileNotFoundError) as raised:
        VQAv2DataModule(missing).check_files("val")
    assert f"`data_dir` {missing} does not exist. HINT: set data_dir to the folder that holds the dataset" in str(
        raised.value
    )
    assert str(raised.value).endswith(
        "or set `val_questions_file` to the file's path (absolute, or relative to `data_dir`)."
    )


def test_an_unset_file_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`val_file` must be set for the val loop of TextDataModule"):
        TextDataModule(_text_root(tmp_path), train_file="wiki.train.raw").check_files("val")
    with pytest.raises(ValueError, match="`test_file` must be set for the test loop of ImageTextPairsDataModule"):
        ImageTextPairsDataModule(tmp_path, "cc3m.json").check_files("test")
    with pytest.raises(ValueError, match="`stage` must be one of 'train', 'val', 'test', got 'validate'"):
        TextDataModule(tmp_path, train_file="wiki.train.raw").check_files("validate")  # type: ignore[arg-type]


def test_a_datamodule_made_of_others_checks_each_part(vqa_root: Path) -> None:
    # The demo's training mix of VQAv2 questions and COCO captions: its training split needs both datasets' files.
    mix = VQACaptionMixDataModule(vqa_root, collate_fn=collate)
    assert set(mix.check_files("val")) == {*VQA_VAL, "image_root"}
    with pytest.raises(DataFileNotFoundError, match=r"COCO train caption annotations.*HINT: set `train_file`"):
        mix.check_files("train")


@pytest.mark.parametrize("name", CASES)
def test_a_data_dir_inside_the_dataset_root_names_the_root(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    datamodule, stage, _ = datamodule_case(name, tmp_path, request)
    inside = datamodule.data_dir / "a_subfolder"
    inside.mkdir()
    arguments = {key: value for key, value in datamodule.hparams.items() if not key.startswith("_")}
    wrong = type(datamodule)(**{**arguments, "data_dir": inside})
    with pytest.raises(DataFileNotFoundError) as raised:
        wrong.check_files(stage)
    message = str(raised.value)
    assert message.endswith(
        f"`data_dir` is {inside}, but the files of this split are in {datamodule.data_dir}. HINT: set data_dir: "
        f"{datamodule.data_dir}"
    ), message
    assert message.count("HINT") == 1, message  # not also "set `val_file`": the file is there, data_dir is wrong


def test_a_data_dir_above_the_dataset_root_names_the_root(tmp_path: Path) -> None:
    (tmp_path / "datasets" / "a_first_folder").mkdir(parents=True)
    vqa = write_vqa(tmp_path / "datasets" / "vqav2")
    with pytest.raises(DataFileNotFoundError, match=re.escape(f"HINT: set data_dir: {vqa}")):
        VQAv2DataModule(tmp_path / "datasets").check_files("val")


def test_a_data_dir_near_no_dataset_root_keeps_the_option_hint(tmp_path: Path) -> None:
    (tmp_path / "datasets" / "empty").mkdir(parents=True)
    with pytest.raises(DataFileNotFoundError, match="HINT: set `val_questions_file`") as raised:
        VQAv2DataModule(tmp_path / "datasets").check_files("val")
    assert "set data_dir" not in str(raised.value)
