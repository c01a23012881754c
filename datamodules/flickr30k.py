"""Flickr30k retrieval and captions in Karpathy's splits."""

from __future__ import annotations

from typing import ClassVar

from ecoflap_pl.datamodules.captions import CaptionDataModule


class Flickr30kDataModule(CaptionDataModule):
    """Flickr30k image-text retrieval (1k test images) and caption evaluation.

    Reads, by ``annotation_format`` (``"auto"`` tries them in this order, in ``data_dir`` and
    ``data_dir/annotations``):

    - ``"karpathy"``: LAVIS ``flickr30k_{train,val,test}.json``, or ``annotations/{train,val,test}.json`` as LAVIS's
      dataset builder stores them (image paths like ``flickr30k-images/x.jpg`` under ``image_root``, by default
      ``data_dir/images`` when it exists, as LAVIS stores them, else ``data_dir``);
    - ``"karpathy_original"``: Karpathy's ``dataset_flickr30k.json`` (images in ``image_root/flickr30k-images/``).

    Training samples: ``{"image", "image_id", "text"}`` (one per caption). Val/test samples:
    ``{"image", "image_id", "references"}`` (one per image with its 5 captions). ``image_id`` is the Flickr
    file number (int). Arguments: see :class:`~ecoflap_pl.datamodules.captions.CaptionDataModule`.
    """

    dataset_name: ClassVar[str] = "Flickr30k"
    karpathy_file: ClassVar[str] = "flickr30k_{split}.json"
    lavis_stored_file: ClassVar[str] = "{split}.json"
    original_file: ClassVar[str] = "dataset_flickr30k.json"
    original_folder: ClassVar[str] = "flickr30k-images"
