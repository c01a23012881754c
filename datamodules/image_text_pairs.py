"""CC3M-style image-text pairs (LAVIS lists ``[{"image", "caption"}]``) for calibration and training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    check_entry,
    check_image_folder,
    expect_type,
    read_json,
    resolve,
    text_list,
    top_level,
)
from ecoflap_pl.datamodules.base import EcoflapDataModule, ImageSampleDataset, Sample, Stage, checked_image_dataset


def read_image_text_pairs(path: Path, option: str, image_root: Path) -> list[Sample]:
    """``{"text"}`` samples of a list ``[{"image": relative path, "caption": str or [str]}]``, one per caption."""
    entries = top_level(read_json(path, option), list, path, option)
    samples: list[Sample] = []
    for index, entry in enumerate(entries):
        where = f"{path}, entry {index}"
        check_entry(entry, ("image", "caption"), where)
        image = str(image_root / expect_type(entry["image"], str, where, "'image'"))
        samples.extend(
            Sample((image,), {"text": text}, where) for text in text_list(entry["caption"], where, "caption")
        )
    return samples


class ImageTextPairsDataModule(EcoflapDataModule):
    """Image-caption pairs, the calibration data of ECoFLaP's BLIP-2 runs (CC3M) and a generic training source.

    Samples: ``{"image", "text"}``, one per caption.

    Args:
        data_dir: dataset root.
        train_file: the training list (calibration reads it), absolute or relative to ``data_dir``.
        val_file: list read by the validation loop, if any.
        test_file: list read by the test/predict loops, if any.
        image_root: folder the ``image`` paths are relative to (default ``data_dir``).
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self.files: dict[Stage, str | None] = {"train": train_file, "val": val_file, "test": test_file}
        self.image_root = resolve(self.data_dir, image_root) if image_root is not None else self.data_dir

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        path, option = self._required_file(stage, self.files[stage], "image-text pairs")
        return {option: path, "image_root": check_image_folder(self.image_root, "image_root", self._image_hint())}

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> ImageSampleDataset:
        option = f"{stage}_file"
        samples = read_image_text_pairs(files[option], option, self.image_root)
        return checked_image_dataset(samples, "image_root", self._image_hint())

    def _image_hint(self) -> str:
        return f"image paths are relative to `image_root` ({self.image_root})."
