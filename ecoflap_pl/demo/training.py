"""Training data of the demo BLIP-2: VQAv2 questions and COCO captions, mixed in every batch.

Both tasks train a BLIP-2 with the same loss, the language-model loss of a target text after a prompt
(``Question: ... Short answer:`` for VQA, ``a photo of`` for captions), and their collators emit the same loss
inputs. :class:`VQACaptionMixDataModule` serves the union of the two training splits through the ordinary
DataModules, and :class:`MultitaskCollator` routes each sample to its task's collator and stacks the results, so one
``Trainer.fit`` of a :class:`~ecoflap_pl.tasks.VQATask` trains the model on both.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.data import ConcatDataset, Dataset

from ecoflap_pl.datamodules import COCOCaptionDataModule, EcoflapDataModule, VQAv2DataModule
from ecoflap_pl.datamodules.base import Stage
from ecoflap_pl.tasks._vision_language import IGNORE_INDEX
from ecoflap_pl.tasks.base import EcoflapTask

Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]
LOSS_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")
_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


class MultitaskCollator:
    """Collates VQA samples (with ``"question"``) and caption samples (with ``"text"``) into one loss batch.

    Each group goes through its task's collator; the loss inputs (:data:`LOSS_KEYS`) are right-padded to a common
    length (padding: id 0, mask 0, label -100) and concatenated, VQA rows first. A batch of VQA samples only is the
    VQA collator's own batch (so validation batches keep their metadata).

    Args:
        vqa: the :class:`~ecoflap_pl.tasks.vqa.VQACollator` of the model.
        captions: the :class:`~ecoflap_pl.tasks.captioning.CaptionCollator` of the model.
    """

    def __init__(self, vqa: Collate, captions: Collate) -> None:
        self.vqa = vqa
        self.captions = captions

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        questions = [sample for sample in samples if "question" in sample]
        captions = [sample for sample in samples if "text" in sample]
        if len(questions) + len(captions) != len(samples):
            raise ValueError(
                "Every sample must be a VQA sample (with 'question') or a caption training sample (with 'text'), got "
                f"keys {[sorted(sample) for sample in samples]}."
            )
        if not captions:
            return self.vqa(questions)
        parts = ([self.vqa(questions)] if questions else []) + [self.captions(captions)]
        length = max(part["input_ids"].shape[1] for part in parts)
        batch = {"pixel_values": torch.cat([part["pixel_values"] for part in parts])}
        for key, value in _PAD_VALUES.items():
            batch[key] = torch.cat([F.pad(part[key], (0, length - part[key].shape[1]), value=value) for part in parts])
        return batch


class VQACaptionMixDataModule(EcoflapDataModule):
    """VQAv2 training questions and COCO training captions of one COCO-layout folder, as one training split.

    Validation and test serve the VQAv2 splits. Files and sample dicts are those of
    :class:`~ecoflap_pl.datamodules.VQAv2DataModule` and :class:`~ecoflap_pl.datamodules.COCOCaptionDataModule`
    (their default splits); batches mix the two in proportion to their sizes.

    Args:
        data_dir: a folder holding both datasets in their official layouts (the demo's ``coco`` folder).
        **kwargs: batch_size, num_workers, collate_fn (a :class:`MultitaskCollator`), calibration_* and shuffle_seed.
    """

    def __init__(self, data_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.vqa = VQAv2DataModule(data_dir)
        self.captions = COCOCaptionDataModule(data_dir)

    def _build(self, stage: Stage) -> Dataset[dict[str, Any]]:
        if stage == "train":
            return ConcatDataset([self.vqa.dataset("train"), self.captions.dataset("train")])
        return self.vqa.dataset(stage)


def fit(task: EcoflapTask, datamodule: EcoflapDataModule, steps: int, seed: int) -> None:
    """Train ``task`` for ``steps`` optimizer steps with the ordinary Lightning ``Trainer`` (no validation, logger or
    checkpoints; a rich progress bar), on one device of whatever accelerator is present.

    Dropout and every other draw from the global generators are seeded with ``seed`` inside a forked RNG state, so
    the caller's random state is left as it was and the same seed trains the same model.
    """
    with tempfile.TemporaryDirectory(prefix="ecoflap-demo-") as root, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer = pl.Trainer(
            accelerator="auto",
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[RichProgressBar(leave=True)],
            default_root_dir=root,
        )
        trainer.fit(task, datamodule=datamodule)
    task.cpu().eval()
