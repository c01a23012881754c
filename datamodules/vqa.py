"""VQAv2 (and OK-VQA) from the official question and annotation files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    DataFormatError,
    check_entry,
    check_image_folder,
    expect_type,
    field_strings,
    get_list,
    locate,
    read_json,
    resolve,
)
from ecoflap_pl.datamodules.base import (
    EcoflapDataModule,
    ImageSampleDataset,
    Sample,
    Stage,
    check_choice,
    checked_image_dataset,
)

# question-file split -> COCO image folder (test-dev2015 images are part of test2015)
IMAGE_FOLDERS = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015", "test-dev2015": "test2015"}


def read_vqa(
    questions_path: Path,
    questions_option: str,
    annotations_path: Path | None,
    annotations_option: str,
    image_root: Path,
    image_folder: str,
) -> list[Sample]:
    """Samples of one VQA split, in question-file order.

    Args:
        questions_path: ``{"questions": [{"image_id", "question", "question_id"}]}``.
        questions_option: the option that set ``questions_path``, for errors.
        annotations_path: ``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type",
            "multiple_choice_answer"}]}``, or ``None`` for test splits (answers ``[]``, answer ``""``).
        annotations_option: the option that set ``annotations_path``, for errors.
        image_root: folder holding the COCO image folders.
        image_folder: ``train2014``, ``val2014`` or ``test2015``; images are
            ``image_root/{image_folder}/COCO_{image_folder}_{image_id:012d}.jpg``.

    ``answer_type`` defaults to ``""`` and ``answer`` to the most frequent answer when an annotation lacks them
    (OK-VQA has no ``multiple_choice_answer``).
    """
    questions = get_list(read_json(questions_path, questions_option), "questions", questions_path, questions_option)
    answers_by_id = None
    if annotations_path is not None:
        document = read_json(annotations_path, annotations_option)
        answers_by_id = _annotations_by_question(
            get_list(document, "annotations", annotations_path, annotations_option), annotations_path
        )
    folder = str(image_root / image_folder)
    samples: list[Sample] = []
    for index, question in enumerate(questions):
        where = f"{questions_path}, questions[{index}]"
        check_entry(question, ("image_id", "question", "question_id"), where)
        question_id = expect_type(question["question_id"], int, where, "'question_id'")
        image_id = expect_type(question["image_id"], int, where, "'image_id'")
        fields: dict[str, Any] = {
            "image_id": image_id,
            "question_id": question_id,
            "question": expect_type(question["question"], str, where, "'question'"),
            "answers": [],
            "answer_type": "",
            "answer": "",
        }
        if answers_by_id is not None:
            if question_id not in answers_by_id:
                raise DataFormatError(f"{where}: question_id {question_id} has no annotation in {annotations_path}.")
            fields.update(answers_by_id[question_id])
        image = f"{folder}{os.sep}COCO_{image_folder}_{image_id:012d}.jpg"
        samples.append(Sample((image,), fields, f"question_id {question_id} ({where})"))
    return samples


def _annotations_by_question(annotations: list[Any], path: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for index, annotation in enumerate(annotations):
        where = f"{path}, annotations[{index}]"
        check_entry(annotation, ("question_id", "answers"), where)
        answers = field_strings(annotation["answers"], "answer", where, "answers")
        answer = annotation.get("multiple_choice_answer")
        if answer is None:
            answer = Counter(answers).most_common(1)[0][0] if answers else ""
        out[annotation["question_id"]] = {
            "answers": answers,
            "answer_type": annotation.get("answer_type", ""),
            "answer": answer,
        }
    return out


class VQAv2DataModule(EcoflapDataModule):
    """Visual question answering on VQAv2 (or OK-VQA) in the official layout.

    Files per split (``train2014``, ``val2014``, ``test2015``, ``test-dev2015``), searched in ``data_dir``,
    ``data_dir/annotations`` and the VQA API's ``data_dir/Questions`` / ``data_dir/Annotations``:
    ``{questions_prefix}_{split}_questions.json`` and, except for test splits, ``{annotations_prefix}_{split}
    _annotations.json``. Images: ``image_root/{train2014,val2014,test2015}/COCO_{folder}_{image_id:012d}.jpg``
    (``image_root``: the VQA API's ``data_dir/Images/mscoco`` when it exists, else ``data_dir``).

    Samples: ``{"image", "image_id", "question_id", "question", "answers" (the 10 human answers; [] for test),
    "answer_type" ("" for test), "answer" (multiple_choice_answer; "" for test)}``.

    Args:
        data_dir: dataset root.
        train_split: split read for training and calibration.
        val_split: split read by the validation loop.
        test_split: split read by the test/predict loops; ``test-dev2015`` for an official submission (no
            answers: the task writes the results file).
        questions_prefix: question file prefix; ``"OpenEnded_mscoco"`` for OK-VQA.
        annotations_prefix: annotation file prefix; ``"mscoco"`` for OK-VQA.
        train_questions_file: overrides the training questions file (absolute or relative to ``data_dir``).
        train_annotations_file: overrides the training annotations file.
        val_questions_file: overrides the validation questions file.
        val_annotations_file: overrides the validation annotations file.
        test_questions_file: overrides the test questions file.
        test_annotations_file: overrides the test annotations file (read even for a test split when set).
        image_root: folder holding ``train2014/``, ``val2014/``, ``test2015/``; default ``data_dir/Images/mscoco``
            when that folder exists (the VQA API's layout), else ``data_dir``.
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        train_split: str = "train2014",
        val_split: str = "val2014",
        test_split: str = "val2014",
        questions_prefix: str = "v2_OpenEnded_mscoco",
        annotations_prefix: str = "v2_mscoco",
        train_questions_file: str | None = None,
        train_annotations_file: str | None = None,
        val_questions_file: str | None = None,
        val_annotations_file: str | None = None,
        test_questions_file: str | None = None,
        test_annotations_file: str | None = None,
        image_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        for name, split in (("train_split", train_split), ("val_split", val_split), ("test_split", test_split)):
            check_choice(name, split, tuple(IMAGE_FOLDERS))
        self.splits: dict[Stage, str] = {"train": train_split, "val": val_split, "test": test_split}
        self.questions_prefix = questions_prefix
        self.annotations_prefix = annotations_prefix
        self.question_files = {"train": train_questions_file, "val": val_questions_file, "test": test_questions_file}
        self.annotation_files = {
            "train": train_annotations_file,
            "val": val_annotations_file,
            "test": test_annotations_file,
        }
        if image_root is not None:
            self.image_root = resolve(self.data_dir, image_root)
        else:
            api_images = self.data_dir / "Images" / "mscoco"  # the VQA API's layout, beside Questions/ and Annotations/
            self.image_root = api_images if api_images.is_dir() else self.data_dir

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        split = self.splits[stage]
        q_option, a_option = f"{stage}_questions_file", f"{stage}_annotations_file"
        files = {
            q_option: self._find(
                self.question_files[stage],
                f"{self.questions_prefix}_{split}_questions.json",
                "Questions",
                q_option,
                f"VQA questions of split {split!r}",
            )
        }
        if self.annotation_files[stage] is not None or not split.startswith("test"):
            files[a_option] = self._find(
                self.annotation_files[stage],
                f"{self.annotations_prefix}_{split}_annotations.json",
                "Annotations",
                a_option,
                f"VQA annotations of split {split!r}",
            )
        files["image_root"] = check_image_folder(
            self.image_root / IMAGE_FOLDERS[split], "image_root", self._image_hint(split)
        )
        return files

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> ImageSampleDataset:
        split = self.splits[stage]
        q_option, a_option = f"{stage}_questions_file", f"{stage}_annotations_file"
        samples = read_vqa(
            files[q_option], q_option, files.get(a_option), a_option, self.image_root, IMAGE_FOLDERS[split]
        )
        return checked_image_dataset(samples, "image_root", self._image_hint(split))

    def _image_hint(self, split: str) -> str:
        folder = IMAGE_FOLDERS[split]
        return f"images are read from `image_root`/{folder} ({self.image_root / folder})."

    def _find(self, override: str | None, name: str, api_folder: str, option: str, what: str) -> Path:
        folders = (self.data_dir, self.data_dir / "annotations", self.data_dir / api_folder)
        return locate(self.data_dir, override, [folder / name for folder in folders], option, what)
