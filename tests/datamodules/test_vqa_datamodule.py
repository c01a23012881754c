"""VQAv2DataModule over the official question/annotation files (and OK-VQA names)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError, VQAv2DataModule
from tests.datamodules.datamodule_layouts import collate, edit_json, vqa_answers, write_vqa

KEYS = {"image", "image_id", "question_id", "question", "answers", "answer_type", "answer"}


def test_train_and_val(vqa_root: Path) -> None:
    dm = VQAv2DataModule(vqa_root, collate_fn=collate)
    train = dm.dataset("train")
    assert len(train) == 3
    sample = train[1]
    assert set(sample) == KEYS
    assert (sample["question_id"], sample["image_id"], sample["question"]) == (11, 1, "is 11 there?")
    assert sample["answers"] == vqa_answers(11) and len(sample["answers"]) == 10
    assert (sample["answer_type"], sample["answer"]) == ("yes/no", "yes")
    assert sample["image"].size == (8, 8) and sample["image"].mode == "RGB"
    assert Path(train.samples[0].images[0]) == vqa_root / "train2014" / "COCO_train2014_000000000001.jpg"
    val = dm.dataset("val")
    assert [val[i]["question_id"] for i in range(len(val))] == [40, 50]


def test_test_dev_has_no_answers_and_reads_test2015_images(vqa_root: Path) -> None:
    dm = VQAv2DataModule(vqa_root, test_split="test-dev2015")
    test = dm.dataset("test")
    sample = test[0]
    assert set(sample) == KEYS
    assert (sample["answers"], sample["answer_type"], sample["answer"]) == ([], "", "")
    assert Path(test.samples[0].images[0]) == vqa_root / "test2015" / "COCO_test2015_000000000007.jpg"


def test_okvqa_names_and_answer_without_multiple_choice(tmp_path: Path) -> None:
    write_vqa(tmp_path, "OpenEnded_mscoco", "mscoco", multiple_choice=False)
    dm = VQAv2DataModule(tmp_path, questions_prefix="OpenEnded_mscoco", annotations_prefix="mscoco")
    sample = dm.dataset("val")[0]
    assert sample["answer"] == "yes"  # the most frequent of the 10 answers
    with pytest.raises(DataFileNotFoundError, match="v2_OpenEnded_mscoco_val2014_questions.json"):
        VQAv2DataModule(tmp_path).dataset("val")


def test_vqa_api_folders(tmp_path: Path) -> None:
    write_vqa(tmp_path, questions_dir="Questions", annotations_dir="Annotations")
    assert len(VQAv2DataModule(tmp_path).dataset("val")) == 2


def test_vqa_api_layout_finds_its_images_folder(tmp_path: Path) -> None:
    # The VQA API's README puts the COCO images in Images/mscoco/{train2014,val2014,test2015}; its Questions/ and
    # Annotations/ were found, but the images were looked for in data_dir/val2014 ("Image folder ... does not exist").
    write_vqa(tmp_path, questions_dir="Questions", annotations_dir="Annotations", images_dir="Images/mscoco")
    dm = VQAv2DataModule(tmp_path, test_split="test-dev2015", collate_fn=collate)
    assert dm.check_files("val")["image_root"] == tmp_path / "Images" / "mscoco" / "val2014"
    assert dm.dataset("val")[0]["image"].size == (8, 8)
    assert Path(dm.dataset("test").samples[0].images[0]).parent == tmp_path / "Images" / "mscoco" / "test2015"


def test_file_overrides(vqa_root: Path) -> None:
    (vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json").rename(vqa_root / "q.json")
    (vqa_root / "v2_mscoco_val2014_annotations.json").rename(vqa_root / "a.json")
    dm = VQAv2DataModule(vqa_root, val_questions_file="q.json", val_annotations_file=str(vqa_root / "a.json"))
    assert dm.dataset("val")[1]["question_id"] == 50


def test_missing_annotations_names_path_and_option(vqa_root: Path) -> None:
    path = vqa_root / "v2_mscoco_val2014_annotations.json"
    path.unlink()
    with pytest.raises(DataFileNotFoundError, match=rf"{path}.*`val_annotations_file`"):
        VQAv2DataModule(vqa_root).dataset("val")


def test_missing_questions_names_option(vqa_root: Path) -> None:
    with pytest.raises(
        DataFileNotFoundError, match=r"v2_OpenEnded_mscoco_test2015_questions\.json.*`test_questions_file`"
    ):
        VQAv2DataModule(vqa_root, test_split="test2015").dataset("test")


def test_corrupt_questions_json(vqa_root: Path) -> None:
    path = vqa_root / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text("{")
    with pytest.raises(DataFormatError, match=rf"{path} \(set by `train_questions_file`\) is not valid JSON"):
        VQAv2DataModule(vqa_root).dataset("train")


def test_missing_top_level_key(vqa_root: Path) -> None:
    path = vqa_root / "v2_mscoco_train2014_annotations.json"
    path.write_text(json.dumps({"info": {}}))
    with pytest.raises(DataFormatError, match=r"missing top-level key 'annotations'"):
        VQAv2DataModule(vqa_root).dataset("train")


QUESTIONS, ANNOTATIONS = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            QUESTIONS,
            lambda data: data["questions"][1].pop("question"),
            r"{path}, questions\[1\]: missing key 'question'",
        ),
        (
            ANNOTATIONS,
            lambda data: data["annotations"][0]["answers"][3].pop("answer"),
            r"annotations\[0\], answers\[3\]: missing key 'answer'",
        ),
        (
            ANNOTATIONS,
            lambda data: data.update(annotations=data["annotations"][:1]),
            r"questions\[1\]: question_id 50 has no annotation",
        ),
    ],
    ids=["missing question key", "missing answer key", "question without annotation"],
)
def test_malformed_val_files(vqa_root: Path, file: str, change: Callable[[Any], object], message: str) -> None:
    path = edit_json(vqa_root / file, change)
    with pytest.raises(DataFormatError, match=message.format(path=path)):
        VQAv2DataModule(vqa_root).dataset("val")


def test_missing_and_corrupt_images_name_question_id(vqa_root: Path) -> None:
    dataset = VQAv2DataModule(vqa_root).dataset("val")
    missing = vqa_root / "val2014" / "COCO_val2014_000000000004.jpg"
    missing.unlink()
    with pytest.raises(DataFileNotFoundError, match=rf"{missing} \(for question_id 40 "):
        dataset[0]
    corrupt = vqa_root / "val2014" / "COCO_val2014_000000000005.jpg"
    corrupt.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=rf"{corrupt} \(for question_id 50 .*`image_root`"):
        dataset[1]


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="`test_split` must be one of 'train2014', 'val2014', 'test2015', 'test-dev2015'"
    ):
        VQAv2DataModule(tmp_path, test_split="test")
