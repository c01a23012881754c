"""NLVR2 from the official JSON-lines files and image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    DataFormatError,
    check_entry,
    check_image_folder,
    expect_type,
    locate,
    read_json_lines,
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

LABELS = {"True": 1, "False": 0}


def read_nlvr2(path: Path, option: str, image_dir: Path, split: str) -> list[Sample]:
    """Samples of one NLVR2 split file (one JSON object per line).

    Args:
        path: ``{train,dev,test1}.json``; lines ``{"identifier", "sentence", "label": "True"|"False", ...}``,
            plus ``"directory"`` on train lines.
        option: the option that set ``path``, for errors.
        image_dir: the split's image folder; images are ``image_dir/[directory/]{identifier minus its last
            -N}-img{0,1}.png``.
        split: ``"train"`` reads images from the ``directory`` sub-folders.
    """
    samples: list[Sample] = []
    for number, entry in read_json_lines(path, option):
        where = f"{path}, line {number}"
        check_entry(entry, ("identifier", "sentence", "label") + (("directory",) if split == "train" else ()), where)
        identifier = expect_type(entry["identifier"], str, where, "'identifier'")
        if "-" not in identifier:
            raise DataFormatError(f"{where}: 'identifier' must look like 'dev-850-0-0', got {identifier!r}.")
        if entry["label"] not in LABELS:
            raise DataFormatError(f"{where}: 'label' must be 'True' or 'False', got {entry['label']!r}.")
        folder = image_dir / str(entry["directory"]) if split == "train" else image_dir
        pair = identifier.rsplit("-", 1)[0]
        samples.append(
            Sample(
                (str(folder / f"{pair}-img0.png"), str(folder / f"{pair}-img1.png")),
                {
                    "identifier": identifier,
                    "sentence": expect_type(entry["sentence"], str, where, "'sentence'"),
                    "label": LABELS[entry["label"]],
                },
                f"identifier {identifier!r} ({where})",
                image_key="images",
            )
        )
    return samples


class NLVR2DataModule(EcoflapDataModule):
    """NLVR2 visual reasoning over image pairs in the official layout.

    Files ``{split}.json`` (searched in ``data_dir`` and ``data_dir/data``, as in the NLVR repository); images
    ``image_root/train/{directory}/``, ``image_root/dev/``, ``image_root/test1/``, named by the identifier without
    its last ``-N`` plus ``-img0.png`` / ``-img1.png``.

    Samples: ``{"images": [left, right], "identifier", "sentence", "label"}`` with label 1 for ``"True"``.

    Args:
        data_dir: dataset root.
        val_split: split read by the validation loop (``dev`` or ``test1``).
        test_split: split read by the test/predict loops.
        train_file: overrides the file the training loop and calibration read (absolute or relative to
            ``data_dir``).
        val_file: overrides the file the validation loop reads.
        test_file: overrides the file the test/predict loops read.
        image_root: folder holding ``train/``, ``dev/``, ``test1/``; default ``data_dir/images`` when that folder
            exists (the official image archives), else ``data_dir``.
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        val_split: str = "dev",
        test_split: str = "test1",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        check_choice("val_split", val_split, ("dev", "test1"))
        check_choice("test_split", test_split, ("dev", "test1"))
        self.splits: dict[Stage, str] = {"train": "train", "val": val_split, "test": test_split}
        self.files: dict[Stage, str | None] = {"train": train_file, "val": val_file, "test": test_file}
        if image_root is not None:
            self.image_root = resolve(self.data_dir, image_root)
        else:
            images = self.data_dir / "images"
            self.image_root = images if images.is_dir() else self.data_dir

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        split, option = self.splits[stage], f"{stage}_file"
        defaults = [self.data_dir / f"{split}.json", self.data_dir / "data" / f"{split}.json"]
        return {
            option: locate(self.data_dir, self.files[stage], defaults, option, f"NLVR2 {split} annotations"),
            "image_root": check_image_folder(self.image_root / split, "image_root", self._image_hint(split)),
        }

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> ImageSampleDataset:
        split, option = self.splits[stage], f"{stage}_file"
        samples = read_nlvr2(files[option], option, self.image_root / split, split)
        return checked_image_dataset(samples, "image_root", self._image_hint(split))

    def _image_hint(self, split: str) -> str:
        return f"images are read from `image_root`/{split} ({self.image_root / split})."
