"""ImageNet-1k from per-wnid folders, or a flat validation folder labelled by Kaggle's ``LOC_val_solution.csv``."""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from pathlib import Path
from typing import Any

from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    DataFileNotFoundError,
    DataFormatError,
    damaged_hint,
    find_dir,
    find_file,
    locate,
    not_utf8,
    read_json,
    resolve,
    top_level,
)
from ecoflap_pl.datamodules.base import (
    EcoflapDataModule,
    ImageSampleDataset,
    Sample,
    Stage,
    check_choice,
    checked_image_dataset,
)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# A line of Kaggle's LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca" (the wnid, then its synonyms).
_SYNSET_LINE = re.compile(r"(n\d{8})\s+(\S.*)")


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (the wnids of a per-class layout).

    Hidden folders (``.ipynb_checkpoints``, ``.DS_Store``-style tool state) are not classes: counting one would shift
    every label after it.
    """
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


def read_class_folders(root: Path, option: str, class_index: dict[str, int]) -> list[Sample]:
    """``{"label", "image_id"}`` samples of every image in ``root/{wnid}/``, by sorted wnid then sorted file name
    (``image_id``: ``"{wnid}/{file name}"``, the path relative to ``root``)."""
    samples: list[Sample] = []
    for wnid in class_folders(root):
        if wnid not in class_index:
            raise DataFormatError(
                f"{root / wnid} (under `{option}`) is not one of the {len(class_index)} classes, which come from the "
                "training folders. HINT: the split must use the training split's wnid folders."
            )
        label = class_index[wnid]
        with os.scandir(root / wnid) as entries:
            names = sorted(
                e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
            )
        samples.extend(
            Sample(
                (str(root / wnid / name),),
                {"label": label, "image_id": f"{wnid}/{name}"},
                f"class {wnid} (label {label})",
            )
            for name in names
        )
    if not samples:
        raise DataFormatError(f"No images found in wnid folders under {root} (set by `{option}`).")
    return samples


def read_val_solution(path: Path, option: str) -> list[tuple[int, str, str]]:
    """``(line, ImageId, wnid)`` rows of Kaggle's ``LOC_val_solution.csv`` (wnid = first PredictionString token).

    A PredictionString is boxes of five tokens, ``wnid x_min y_min x_max y_max`` (or the wnid alone): a row cut short
    inside its boxes loses that count, so such a file is refused at its last row. An ImageId listed twice is refused
    too: its image would be evaluated twice (and its ``image_id`` would not name one sample).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} (set by `{option}`) {not_utf8(err)}. {damaged_hint(option)}") from err
    cut = "" if text.endswith("\n") else " The file does not end with a newline: it may be cut short."
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DataFormatError(
                f"{path} (set by `{option}`) must start with the header 'ImageId,PredictionString', got {header!r}."
                f"{cut} {damaged_hint(option)}"
            )
        for number, row in enumerate(reader, start=2):
            boxes = row[1].split() if len(row) >= 2 else []
            if not boxes or not row[0].strip() or (len(boxes) > 1 and len(boxes) % 5):
                raise DataFormatError(
                    f"{path}, line {number}: expected 'ImageId,wnid' or 'ImageId,wnid x_min y_min x_max y_max ...' "
                    f"(five tokens per box), got {row!r}.{cut} {damaged_hint(option)}"
                )
            rows.append((number, row[0].strip(), boxes[0]))
    except csv.Error as err:  # e.g. a field over the size limit: a binary file
        raise DataFormatError(
            f"{path} (set by `{option}`), line {reader.line_num} is not CSV: {err}. {damaged_hint(option)}"
        ) from err
    rows.sort(key=lambda r: r[1])
    for (line, image_id, _), (other_line, other_id, _) in zip(rows, rows[1:], strict=False):
        if image_id == other_id:
            raise DataFormatError(
                f"{path} (set by `{option}`) lists ImageId {image_id} twice (lines {line} and {other_line}): its image "
                f"would be evaluated twice. {damaged_hint(option)}"
            )
    return rows


class ImageNetDataModule(EcoflapDataModule):
    """ImageNet-1k classification (also zero-shot: ``class_names`` feeds the prompts).

    ``train_dir/{wnid}/*.JPEG``; ``val_dir`` either holds the same wnid folders or the flat
    ``ILSVRC2012_val_*.JPEG`` files labelled by ``LOC_val_solution.csv``. Classes are the sorted wnids of the
    training folders (else of the val folders, else of the CSV). Samples: ``{"image", "label", "image_id"}``, the
    ``image_id`` being the image's path relative to the split folder (``n01440764/n01440764_10026.JPEG``; in a flat
    validation folder ``ILSVRC2012_val_00000001.JPEG``): evaluation counts a repeated ``image_id`` once (DDP).

    Args:
        data_dir: dataset root (for Kaggle's archive, ``ILSVRC/Data/CLS-LOC``).
        train_dir: training folder, relative to ``data_dir`` or absolute.
        val_dir: validation folder, relative to ``data_dir`` or absolute.
        val_solution_file: the CSV labelling a flat ``val_dir``; default: ``LOC_val_solution.csv`` in
            ``data_dir``, or in the Kaggle root three levels up when ``data_dir`` ends with ``Data/CLS-LOC``.
        class_names_file: readable class names: a JSON ``{wnid: name}`` or list, a text file with one name per
            line in class order, or Kaggle's ``LOC_synset_mapping.txt`` (``wnid synonym, synonym, ...`` per line;
            each class gets the first synonym of its wnid, as timm's names do). Default: timm's ImageNet names when
            the wnids are ImageNet's, else the wnids.
        val_split: split read by the validation loop (``val`` or ``train``).
        test_split: split read by the test/predict loops (ImageNet's test labels are not public).
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        train_dir: str = "train",
        val_dir: str = "val",
        val_solution_file: str | None = None,
        class_names_file: str | None = None,
        val_split: str = "val",
        test_split: str = "val",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        check_choice("val_split", val_split, ("train", "val"))
        check_choice("test_split", test_split, ("train", "val"))
        self.train_dir = resolve(self.data_dir, train_dir)
        self.val_dir = resolve(self.data_dir, val_dir)
        self.val_solution_file = val_solution_file
        self.class_names_file = class_names_file
        self.splits: dict[Stage, str] = {"train": "train", "val": val_split, "test": test_split}

    @functools.cached_property
    def classes(self) -> list[str]:
        """Sorted wnids; index = label."""
        if self.train_dir.is_dir():
            return class_folders(self.train_dir)
        if self.val_dir.is_dir():
            folders = class_folders(self.val_dir)
            return folders or sorted({w for _, _, w in read_val_solution(self._solution_path(), "val_solution_file")})
        raise DataFileNotFoundError(
            f"ImageNet class folders not found: expected {self.train_dir} (set by `train_dir`) or {self.val_dir} "
            "(set by `val_dir`). HINT: set them relative to `data_dir` or as absolute paths."
        )

    @functools.cached_property
    def class_names(self) -> list[str]:
        """Readable class names in label order (for zero-shot prompts)."""
        if self.class_names_file is not None:
            return self._names_from_file()
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        if set(self.classes) <= set(info.label_names()):
            return [info.label_name_to_description(wnid).split(",")[0].strip() for wnid in self.classes]
        return list(self.classes)

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        """The split's folder; for a flat validation folder (no wnid sub-folders) also the CSV labelling it; and
        ``class_names_file`` when it is set."""
        split = self.splits[stage]
        option = f"{split}_dir"
        root = find_dir(self.train_dir if split == "train" else self.val_dir, option, f"ImageNet {split} folder")
        files = {option: root}
        if split != "train" and not class_folders(root):
            files["val_solution_file"] = self._solution_path()
        if self.class_names_file is not None:
            files["class_names_file"] = self._class_names_path()
        return files

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> ImageSampleDataset:
        option = f"{self.splits[stage]}_dir"
        root = files[option]
        class_index = {wnid: i for i, wnid in enumerate(self.classes)}
        if "class_names_file" in files:
            self.class_names  # noqa: B018 -- read with the split, so that a damaged file is reported when it is read
        hint = f"images are read from `{option}` ({root})."
        if "val_solution_file" in files:
            return checked_image_dataset(
                self._read_flat_val(root, files["val_solution_file"], class_index), option, hint
            )
        # the images of class folders are found by listing them: each exists
        return ImageSampleDataset(read_class_folders(root, option, class_index), hint)

    def _read_flat_val(self, root: Path, path: Path, class_index: dict[str, int]) -> list[Sample]:
        samples: list[Sample] = []
        for number, image_id, wnid in read_val_solution(path, "val_solution_file"):
            if wnid not in class_index:
                raise DataFormatError(f"{path}, line {number}: wnid {wnid!r} of {image_id} is not a known class.")
            source = f"ImageId {image_id} ({path}, line {number})"
            name = f"{image_id}.JPEG"
            samples.append(Sample((str(root / name),), {"label": class_index[wnid], "image_id": name}, source))
        return samples

    def _solution_path(self) -> Path:
        defaults = [self.data_dir / "LOC_val_solution.csv"]
        if self.data_dir.parts[-2:] == ("Data", "CLS-LOC"):
            defaults.append(self.data_dir.parents[2] / "LOC_val_solution.csv")
        what = f"ImageNet validation labels for the flat folder {self.val_dir}"
        return locate(self.data_dir, self.val_solution_file, defaults, "val_solution_file", what)

    def _class_names_path(self) -> Path:
        path = resolve(self.data_dir, str(self.class_names_file))
        return find_file([path], "class_names_file", "ImageNet class names")

    def _names_by_wnid(self, names: dict[str, Any], path: Path) -> list[Any]:
        """The name of each class in label order from ``{wnid: name}`` read from ``path``; a missing wnid is named."""
        missing = [wnid for wnid in self.classes if wnid not in names]
        if missing:
            raise DataFormatError(f"{path} (set by `class_names_file`) has no name for {missing[:5]}.")
        return [names[wnid] for wnid in self.classes]

    def _names_from_file(self) -> list[str]:
        path = self._class_names_path()
        if path.suffix == ".json":
            names = read_json(path, "class_names_file")
            if isinstance(names, dict):
                names = self._names_by_wnid(names, path)
            top_level(names, list, path, "class_names_file")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path} (set by `class_names_file`) {not_utf8(err)}. {damaged_hint('class_names_file')}"
                ) from err
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            synsets = [match for line in lines if (match := _SYNSET_LINE.fullmatch(line))]
            if lines and len(synsets) == len(lines):  # read by wnid: the file may list more classes than the folders
                names = self._names_by_wnid({match[1]: match[2].split(",")[0].strip() for match in synsets}, path)
            else:
                names = lines
        if len(names) != len(self.classes) or not all(isinstance(n, str) for n in names):
            raise DataFormatError(
                f"{path} (set by `class_names_file`) must hold {len(self.classes)} string names (one per class), "
                f"got {len(names)}."
            )
        return names
