"""COCO captions and retrieval: Karpathy splits (LAVIS lists or ``dataset_coco.json``) or the official captions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from typing_extensions import override

from ecoflap_pl.datamodules._io import DataFileNotFoundError, DataFormatError, check_entry, expect_type, get_list
from ecoflap_pl.datamodules.base import Sample, Stage
from ecoflap_pl.datamodules.captions import CaptionDataModule

_OFFICIAL_NAME = re.compile(r"captions_((?:train|val)\d{4})\.json$")


def read_coco_official(document: Any, path: Path, option: str, image_root: Path) -> list[Sample]:
    """Per-image samples (``image_id``, ``references``) of an official ``captions_{train,val}{year}.json``.

    Images are ``image_root / {train,val}{year} / file_name``; the folder comes from the file's name, or from
    the images' ``coco_url`` when the file was renamed. Images without captions are left out.
    """
    images = get_list(document, "images", path, option)
    annotations = get_list(document, "annotations", path, option)
    folder = _image_folder(path, option, images)
    file_names: dict[Any, str] = {}
    for index, image in enumerate(images):
        check_entry(image, ("id", "file_name"), f"{path}, images[{index}]")
        file_names[image["id"]] = image["file_name"]
    references: dict[Any, list[str]] = {}
    first_annotation: dict[Any, Any] = {}
    for index, annotation in enumerate(annotations):
        where = f"{path}, annotations[{index}]"
        check_entry(annotation, ("id", "image_id", "caption"), where)
        image_id = annotation["image_id"]
        if image_id not in file_names:
            raise DataFormatError(
                f"{where} (annotation id {annotation['id']}): image_id {image_id!r} is not in 'images'."
            )
        references.setdefault(image_id, []).append(expect_type(annotation["caption"], str, where, "'caption'"))
        first_annotation.setdefault(image_id, annotation["id"])
    return [
        Sample(
            (str(image_root / folder / file_names[image_id]),),
            {"image_id": image_id, "references": refs},
            f"image_id {image_id} (annotation id {first_annotation[image_id]} in {path})",
        )
        for image_id, refs in ((i, references[i]) for i in file_names if i in references)
    ]


def _image_folder(path: Path, option: str, images: list[Any]) -> str:
    match = _OFFICIAL_NAME.search(path.name)
    if match:
        return match.group(1)
    url = images[0].get("coco_url") if images and isinstance(images[0], dict) else None
    if isinstance(url, str) and "/" in url:
        return url.rstrip("/").split("/")[-2]
    raise DataFormatError(
        f"Cannot tell the image folder of {path} (set by `{option}`): its name is not captions_<split><year>.json "
        "and its images have no 'coco_url'. HINT: keep the official file name, e.g. captions_val2014.json."
    )


class COCOCaptionDataModule(CaptionDataModule):
    """COCO captioning and image-text retrieval.

    Reads, by ``annotation_format`` (``"auto"`` tries them in this order, in ``data_dir`` and
    ``data_dir/annotations``):

    - ``"karpathy"``: LAVIS/BLIP ``coco_karpathy_{train,val,test}.json`` (image paths like
      ``val2014/COCO_val2014_000000522418.jpg`` under ``image_root``);
    - ``"karpathy_original"``: Karpathy's ``dataset_coco.json`` (``restval`` counts as train);
    - ``"official"``: ``annotations/captions_{train,val}2017.json`` (else ``...2014.json``), images in
      ``{train,val}{year}/``. The official release has no test captions: use ``test_split: val``.

    Training samples: ``{"image", "image_id", "text"}`` (one per caption). Val/test samples:
    ``{"image", "image_id", "references"}`` (one per image, every caption; the retrieval gallery too).
    ``image_id`` is the COCO image id (int). Arguments: see
    :class:`~ecoflap_pl.datamodules.captions.CaptionDataModule`.
    """

    dataset_name: ClassVar[str] = "COCO"
    formats: ClassVar[tuple[str, ...]] = ("karpathy", "karpathy_original", "official")
    karpathy_file: ClassVar[str] = "coco_karpathy_{split}.json"
    original_file: ClassVar[str] = "dataset_coco.json"

    @override
    def _parse(self, fmt: str, document: Any, path: Path, option: str, split: str) -> list[Sample]:
        if fmt == "official":
            return read_coco_official(document, path, option, self.image_root)
        return super()._parse(fmt, document, path, option, split)

    @override
    def _image_folder(self, path: Path) -> Path:
        """``image_root/{train,val}{year}`` for an official ``captions_{train,val}{year}.json``, else ``image_root``."""
        match = _OFFICIAL_NAME.search(path.name)
        return self.image_root / match.group(1) if match else self.image_root

    @override
    def _candidates(self, fmt: str, split: str) -> list[Path]:
        if fmt != "official":
            return super()._candidates(fmt, split)
        if split == "test":
            if self.annotation_format == "official":
                raise ValueError(
                    "The official COCO captions have no test split, got `test_split='test'` (or `val_split`) with "
                    "`annotation_format='official'`. HINT: set `test_split: val`, or use the Karpathy files."
                )
            return []
        return [self.data_dir / "annotations" / f"captions_{split}{year}.json" for year in (2017, 2014)]

    @override
    def _find_file(self, stage: Stage, split: str, option: str) -> Path:
        """The annotation file of ``split``; without one for the test split, a folder holding only the official
        captions (which have no test split) is told how to evaluate on them."""
        try:
            return super()._find_file(stage, split, option)
        except DataFileNotFoundError as error:
            official = [path for path in self._candidates("official", "val") if path.is_file()]
            if split != "test" or self.files[stage] is not None or self.annotation_format != "auto" or not official:
                raise
            not_found = str(error).partition(" HINT: ")[0]
            split_option = "test_split" if stage == "test" else "val_split"
            raise DataFileNotFoundError(
                f"{not_found} The official COCO captions found, {official[0]}, have no test split. HINT: set "
                f"`{split_option}: val` to evaluate on {official[0].name}, or add the Karpathy split files "
                "(coco_karpathy_test.json of LAVIS, or dataset_coco.json) for the Karpathy test split."
            ) from error
