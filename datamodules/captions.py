"""Karpathy-split caption files (LAVIS lists and Karpathy's ``dataset_*.json``) and the caption DataModule base.

COCO and Flickr30k share both formats; :class:`CaptionDataModule` holds everything but the file names, and COCO
adds its official ``annotations/captions_*.json`` on top (``coco.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    DataFormatError,
    check_entry,
    check_image_folder,
    expect_type,
    get_list,
    image_id_from_name,
    locate,
    read_json,
    resolve,
    text_list,
    wrong_file_hint,
)
from ecoflap_pl.datamodules.base import (
    EcoflapDataModule,
    ImageSampleDataset,
    Sample,
    Stage,
    check_choice,
    checked_image_dataset,
)

SPLITS = ("train", "val", "test")
# Karpathy's dataset_*.json split labels per split; restval images count as training images.
ORIGINAL_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy_list(entries: list[Any], path: Path, image_root: Path) -> list[Sample]:
    """Per-image samples (``image_id``, ``references``) of a LAVIS Karpathy list ``[{"image", "caption"}]``.

    ``caption`` is one string (training files: one entry per caption) or a list (val/test: one entry per image);
    entries of the same image are merged in file order. ``image`` is relative to ``image_root``.
    """
    by_image: dict[str, Sample] = {}
    for index, entry in enumerate(entries):
        where = f"{path}, entry {index}"
        check_entry(entry, ("image", "caption"), where)
        image = expect_type(entry["image"], str, where, "'image'")
        captions = text_list(entry["caption"], where, "caption")
        if image not in by_image:
            image_id = image_id_from_name(image)
            by_image[image] = Sample(
                (str(image_root / image),), {"image_id": image_id, "references": []}, f"image_id {image_id} ({where})"
            )
        by_image[image].fields["references"].extend(captions)
    return list(by_image.values())


def read_karpathy_original(
    document: Any, path: Path, option: str, image_root: Path, split: str, default_folder: str
) -> list[Sample]:
    """Per-image samples of Karpathy's ``dataset_{coco,flickr30k}.json`` for one split.

    Args:
        document: the parsed file, ``{"images": [{"filename", "split", "sentences": [{"raw"}], ...}]}``.
        path: the file, for errors.
        option: the DataModule option that set ``path``.
        image_root: images are ``image_root / filepath / filename`` (``filepath`` defaults to ``default_folder``).
        split: ``"train"`` (with ``restval``), ``"val"`` or ``"test"``.
        default_folder: the image folder when an entry has no ``filepath`` (Flickr30k: ``flickr30k-images``).
    """
    samples: list[Sample] = []
    for index, entry in enumerate(get_list(document, "images", path, option)):
        where = f"{path}, images[{index}]"
        check_entry(entry, ("filename", "split", "sentences"), where)
        if entry["split"] not in ("train", "restval", "val", "test"):
            raise DataFormatError(f"{where}: 'split' must be train, restval, val or test, got {entry['split']!r}.")
        if entry["split"] not in ORIGINAL_SPLITS[split]:
            continue
        sentences = expect_type(entry["sentences"], list, where, "'sentences'")
        references = [check_entry(s, ("raw",), f"{where}, sentences[{i}]")["raw"] for i, s in enumerate(sentences)]
        image_id = entry.get("cocoid", image_id_from_name(entry["filename"]))
        image = image_root / entry.get("filepath", default_folder) / entry["filename"]
        samples.append(
            Sample((str(image),), {"image_id": image_id, "references": references}, f"image_id {image_id} ({where})")
        )
    return samples


def per_caption(samples: list[Sample]) -> list[Sample]:
    """Training samples: one ``{"image_id", "text"}`` sample per reference of each per-image sample."""
    return [
        Sample(s.images, {"image_id": s.fields["image_id"], "text": text}, s.source)
        for s in samples
        for text in s.fields["references"]
    ]


def caption_format(document: Any) -> str | None:
    """Which caption format a parsed annotation file is in, from its structure; ``None`` when none fits."""
    if isinstance(document, list):
        return "karpathy"
    if isinstance(document, dict) and "annotations" in document:
        return "official"
    if isinstance(document, dict) and "images" in document:
        return "karpathy_original"
    return None


class CaptionDataModule(EcoflapDataModule):
    """Image captioning and image-text retrieval data in Karpathy's splits.

    Training samples are one per caption, ``{"image", "image_id", "text"}``; val/test samples are one per image
    with every reference, ``{"image", "image_id", "references"}`` (also the retrieval gallery). ``image_id`` is the
    dataset's numeric image id (COCO id, Flickr30k file number).

    Args:
        data_dir: dataset root.
        annotation_format: ``"karpathy"`` (LAVIS lists), ``"karpathy_original"`` (``dataset_*.json``),
            ``"official"`` (COCO only) or ``"auto"``: the first format whose file is found, tried in that order.
        train_file: annotation file the training loop and calibration read, overriding the search (absolute or
            relative to ``data_dir``). The file's format is recognised from its content; for
            ``dataset_*.json`` the entries of the loop's split are kept.
        val_file: annotation file the validation loop reads (split ``val_split``).
        test_file: annotation file the test/predict loops read (split ``test_split``).
        image_root: folder the annotation image paths are relative to; default ``data_dir/images`` when that folder
            exists (LAVIS's storage layout: ``coco/images/``, ``flickr30k/images/``), else ``data_dir``.
        val_split: the split the validation loop reads, ``"val"`` or ``"test"``.
        test_split: the split the test/predict loops read, ``"val"`` or ``"test"``.
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    dataset_name: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ("karpathy", "karpathy_original")
    karpathy_file: ClassVar[str] = ""  # LAVIS file name with a {split} field
    lavis_stored_file: ClassVar[str] = ""  # the name LAVIS's dataset builder stores it under, when another one
    original_file: ClassVar[str] = ""  # Karpathy's single file
    original_folder: ClassVar[str] = ""  # image folder of original entries that have no "filepath"

    def __init__(
        self,
        data_dir: str | Path,
        annotation_format: str = "auto",
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        val_split: str = "val",
        test_split: str = "test",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        check_choice("annotation_format", annotation_format, ("auto", *self.formats))
        check_choice("val_split", val_split, SPLITS)
        check_choice("test_split", test_split, SPLITS)
        self.annotation_format = annotation_format
        self.files: dict[Stage, str | None] = {"train": train_file, "val": val_file, "test": test_file}
        if image_root is not None:
            self.image_root = resolve(self.data_dir, image_root)
        else:
            images = self.data_dir / "images"
            self.image_root = images if images.is_dir() else self.data_dir
        self.val_split = val_split
        self.test_split = test_split

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        """The annotation file and ``image_root`` (the images' folder itself when the file's name tells it)."""
        option = f"{stage}_file"
        path = self._find_file(stage, self._split(stage), option)
        return {
            option: path,
            "image_root": check_image_folder(self._image_folder(path), "image_root", self._image_hint()),
        }

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> ImageSampleDataset:
        option = f"{stage}_file"
        samples = self._read_samples(files[option], option, self._split(stage))
        return checked_image_dataset(
            per_caption(samples) if stage == "train" else samples, "image_root", self._image_hint()
        )

    def _image_folder(self, path: Path) -> Path:
        """The folder holding the images of the annotation file ``path``, known from its name: ``image_root``."""
        return self.image_root

    def _split(self, stage: Stage) -> str:
        return {"train": "train", "val": self.val_split, "test": self.test_split}[stage]

    def _read_samples(self, path: Path, option: str, split: str) -> list[Sample]:
        """Per-image samples (``image_id``, ``references``) of ``split`` in the file ``path``, images unread."""
        document = read_json(path, option)
        found = caption_format(document)
        if found is None or found not in self.formats:
            raise DataFormatError(
                f"{path} (set by `{option}`) is not a {self.dataset_name} caption file in a known format: expected a "
                f"list of {{'image', 'caption'}} (karpathy), {{'images': [...]}} (karpathy_original)"
                + (", {'images', 'annotations'} (official)" if "official" in self.formats else "")
                + f". {wrong_file_hint(option)}"
            )
        if self.annotation_format not in ("auto", found):
            raise DataFormatError(
                f"{path} (set by `{option}`) is in the {found!r} format, but `annotation_format` is "
                f"{self.annotation_format!r}. HINT: set `annotation_format: {found}` or `auto`."
            )
        return self._parse(found, document, path, option, split)

    def _parse(self, fmt: str, document: Any, path: Path, option: str, split: str) -> list[Sample]:
        if fmt == "karpathy":
            return read_karpathy_list(document, path, self.image_root)
        return read_karpathy_original(document, path, option, self.image_root, split, self.original_folder)

    def _candidates(self, fmt: str, split: str) -> list[Path]:
        name = self.karpathy_file.format(split=split) if fmt == "karpathy" else self.original_file
        paths = [self.data_dir / name, self.data_dir / "annotations" / name]
        if fmt == "karpathy" and self.lavis_stored_file:
            paths.append(self.data_dir / "annotations" / self.lavis_stored_file.format(split=split))
        return paths

    def _find_file(self, stage: Stage, split: str, option: str) -> Path:
        formats = self.formats if self.annotation_format == "auto" else (self.annotation_format,)
        defaults = (
            [path for fmt in formats for path in self._candidates(fmt, split)] if self.files[stage] is None else []
        )
        what = f"{self.dataset_name} {split} caption annotations (annotation_format={self.annotation_format!r})"
        return locate(self.data_dir, self.files[stage], defaults, option, what)

    def _image_hint(self) -> str:
        return f"image paths in the annotation files are relative to `image_root` ({self.image_root})."
