"""LightningDataModules (and their plain Datasets) reading the official dataset layouts as RAW sample dicts."""

from ecoflap_pl.datamodules._io import DataFileNotFoundError, DataFormatError
from ecoflap_pl.datamodules.base import EcoflapDataModule, ImageSampleDataset, Sample, checked_image_dataset
from ecoflap_pl.datamodules.captions import CaptionDataModule
from ecoflap_pl.datamodules.coco import COCOCaptionDataModule
from ecoflap_pl.datamodules.flickr30k import Flickr30kDataModule
from ecoflap_pl.datamodules.image_text_pairs import ImageTextPairsDataModule
from ecoflap_pl.datamodules.imagenet import ImageNetDataModule
from ecoflap_pl.datamodules.nlvr2 import NLVR2DataModule
from ecoflap_pl.datamodules.text import TextDataModule
from ecoflap_pl.datamodules.vqa import VQAv2DataModule

__all__ = [
    "COCOCaptionDataModule",
    "CaptionDataModule",
    "DataFileNotFoundError",
    "DataFormatError",
    "EcoflapDataModule",
    "Flickr30kDataModule",
    "ImageNetDataModule",
    "ImageSampleDataset",
    "ImageTextPairsDataModule",
    "NLVR2DataModule",
    "Sample",
    "TextDataModule",
    "VQAv2DataModule",
    "checked_image_dataset",
]
