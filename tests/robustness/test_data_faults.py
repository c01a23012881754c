"""Bad data files given to the DataModules (the demo's VQAv2 and ImageNet layouts, broken one way at a time): each
is refused with a message naming the file, entry or option, or read correctly (see ``CASES.md``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ecoflap_pl.datamodules import ImageNetDataModule, VQAv2DataModule
from ecoflap_pl.datamodules._io import DataFileNotFoundError, DataFormatError

VAL_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VAL_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


def raw(samples):
    return samples


def vqa(demo_data, **files) -> VQAv2DataModule:
    return VQAv2DataModule(demo_data.coco, collate_fn=raw, batch_size=2, **files)


def questions(demo_data) -> dict:
    return json.loads((demo_data.coco / VAL_QUESTIONS).read_text(encoding="utf-8"))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_an_empty_val_split_is_refused(demo_data, tmp_path):
    empty = write(tmp_path / "q.json", json.dumps({**questions(demo_data), "questions": []}))
    expected = r"VQAv2DataModule: the split read for the val loop has no samples \(read from .*`val_questions_file` "
    expected += re.escape(empty)
    with pytest.raises(DataFormatError, match=expected):
        vqa(demo_data, val_questions_file=empty).setup("validate")


def test_an_empty_training_split_is_refused_for_calibration(demo_data, tmp_path):
    empty = write(tmp_path / "q.json", json.dumps({**questions(demo_data), "questions": []}))
    data = vqa(demo_data, train_questions_file=empty, train_annotations_file=str(demo_data.coco / VAL_ANNOTATIONS))
    with pytest.raises(DataFormatError, match="the split read for calibration and training has no samples"):
        data.calibration_dataloader(4)


def test_a_truncated_json_file_names_the_file(demo_data, tmp_path):
    text = (demo_data.coco / VAL_QUESTIONS).read_text(encoding="utf-8")
    cut = write(tmp_path / "q.json", text[: len(text) // 2])
    expected = r"q\.json \(set by `val_questions_file`\) is not valid JSON: the file ends before .*: it is cut short"
    with pytest.raises(DataFormatError, match=expected):
        vqa(demo_data, val_questions_file=cut).setup("validate")


def test_an_entry_without_a_key_names_the_entry_and_key(demo_data, tmp_path):
    document = questions(demo_data)
    del document["questions"][1]["image_id"]
    broken = write(tmp_path / "q.json", json.dumps(document))
    with pytest.raises(DataFormatError, match=r"questions\[1\]: missing key 'image_id'"):
        vqa(demo_data, val_questions_file=broken).setup("validate")


def test_a_top_level_of_the_wrong_type(demo_data, tmp_path):
    broken = write(tmp_path / "q.json", json.dumps(questions(demo_data)["questions"]))
    expected = r"the top level must be a JSON object, got a JSON array\. HINT: check that `val_questions_file` names"
    with pytest.raises(DataFormatError, match=expected):
        vqa(demo_data, val_questions_file=broken).setup("validate")


def test_a_question_about_a_missing_image_names_the_image(demo_data, tmp_path):
    document = questions(demo_data)
    document["questions"][0]["image_id"] = 999_999
    broken = write(tmp_path / "q.json", json.dumps(document))
    data = vqa(demo_data, val_questions_file=broken)
    with pytest.raises(
        DataFileNotFoundError, match=r"Missing images: 1 of .*\n  .*000000999999\.jpg \(for question_id"
    ):
        data.setup("validate")  # when the split is read, before any batch


@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20], ids=["text", "cut"])
def test_an_image_that_does_not_decode_names_the_file(demo_data, tmp_path, content):
    root = tmp_path / "coco"
    shutil.copytree(demo_data.coco / "val2014", root / "val2014")
    image = sorted((root / "val2014").iterdir())[0]
    image.write_bytes(content)
    data = vqa(demo_data, image_root=str(root))
    samples = data.dataset("val")
    index = next(i for i in range(len(samples)) if samples.samples[i].images[0] == str(image))
    with pytest.raises(DataFormatError, match=rf"Image {image} \(for question_id .*\) cannot be read"):
        samples[index]


def test_an_image_too_large_for_pil_names_the_file(demo_data, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(demo_data.coco / "val2014", root / "val2014")
    image = sorted((root / "val2014").iterdir())[0]
    Image.new("1", (13_380, 13_380)).save(image, format="PNG")  # 179 million pixels, over PIL's limit; a 22 kB file
    samples = vqa(demo_data, image_root=str(root)).dataset("val")
    index = next(i for i in range(len(samples)) if samples.samples[i].images[0] == str(image))
    with pytest.raises(
        DataFormatError, match=rf"Image {image} \(for question_id .*\) is too large to open: .*HINT: PIL"
    ):
        samples[index]


def test_a_missing_data_dir_names_the_path_and_option(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="HINT: set `val_questions_file`"):
        VQAv2DataModule(tmp_path / "nowhere", collate_fn=raw).setup("validate")


@pytest.mark.parametrize("option", ["batch_size", "calibration_batch_size", "calibration_samples"])
def test_a_zero_size_is_refused_in_one_line(demo_data, option):
    with pytest.raises(ValueError, match=rf"`{option}` must be an int >= 1, got 0\."):
        VQAv2DataModule(demo_data.coco, collate_fn=raw, **{option: 0})


def test_hidden_folders_and_files_in_imagenet_train_do_not_shift_labels(demo_data, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(demo_data.imagenet, root)
    clean = ImageNetDataModule(demo_data.imagenet, collate_fn=raw)
    expected = [(Path(s.images[0]).name, s.fields["label"]) for s in clean.dataset("train").samples]
    (root / "train" / ".ipynb_checkpoints").mkdir()
    first = sorted(p for p in (root / "train").iterdir() if not p.name.startswith("."))[0]
    (first / "._digit.JPEG").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble metadata, not an image
    stray = ImageNetDataModule(root, collate_fn=raw)
    assert stray.classes == clean.classes
    assert [(Path(s.images[0]).name, s.fields["label"]) for s in stray.dataset("train").samples] == expected


def test_a_question_without_annotation_names_it(demo_data, tmp_path):
    annotations = json.loads((demo_data.coco / VAL_ANNOTATIONS).read_text(encoding="utf-8"))
    missing = annotations["annotations"].pop(0)["question_id"]
    broken = write(tmp_path / "a.json", json.dumps(annotations))
    with pytest.raises(DataFormatError, match=rf"question_id {missing} has no annotation in .*a\.json"):
        vqa(demo_data, val_annotations_file=broken).setup("validate")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_images_in_other_colour_modes_are_read_as_rgb(demo_data, tmp_path, mode):
    root = tmp_path / "coco"
    shutil.copytree(demo_data.coco / "val2014", root / "val2014")
    image = sorted((root / "val2014").iterdir())[0]
    with Image.open(image) as original:
        original.convert(mode).save(image, format="TIFF" if mode == "CMYK" else "PNG")  # a PNG/TIFF named .jpg
    samples = vqa(demo_data, image_root=str(root)).dataset("val")
    index = next(i for i in range(len(samples)) if samples.samples[i].images[0] == str(image))
    assert samples[index]["image"].mode == "RGB"
