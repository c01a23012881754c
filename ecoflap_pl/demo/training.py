"""Training data of the demo BLIP-2: VQAv2 questions and COCO captions, in alternating single-task batches.

Both tasks train a BLIP-2 with the same loss, the language-model loss of a target text after a prompt
(``Question: ... Short answer:`` for VQA, ``a photo of`` for captions), and their collators emit the same loss
inputs. :class:`VQACaptionMixDataModule` serves the union of the two training splits through the ordinary
DataModules, and :class:`MultitaskCollator` sends each batch to its task's collator, so one ``Trainer.fit`` of a
:class:`~ecoflap_pl.tasks.VQATask` trains the model on both.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, Dataset
from transformers.trainer_pt_utils import get_length_grouped_indices
from typing_extensions import override

from ecoflap_pl.datamodules import COCOCaptionDataModule, EcoflapDataModule, VQAv2DataModule
from ecoflap_pl.datamodules._io import load_image
from ecoflap_pl.datamodules.base import ImageSampleDataset, Stage
from ecoflap_pl.datamodules.resumable import ResumableLoader, ResumableOrder
from ecoflap_pl.demo.progress import StepBar
from ecoflap_pl.tasks.base import EcoflapTask

Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]
Preprocess = Callable[[list[dict[str, Any]]], torch.Tensor]


class MultitaskCollator:
    """Collates a batch of VQA samples (with ``"question"``) with the VQA collator, and a batch of caption samples
    (with ``"text"``) with the caption collator.

    Args:
        vqa: the :class:`~ecoflap_pl.tasks.vqa.VQACollator` of the model.
        captions: the :class:`~ecoflap_pl.tasks.captioning.CaptionCollator` of the model.
    """

    def __init__(self, vqa: Collate, captions: Collate) -> None:
        self.vqa = vqa
        self.captions = captions

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if all("question" in sample for sample in samples):
            return self.vqa(samples)
        if all("text" in sample for sample in samples):
            return self.captions(samples)
        raise ValueError(
            "A batch must hold only VQA samples (with 'question') or only caption training samples (with 'text'), "
            f"got keys {[sorted(sample) for sample in samples]}. HINT: VQACaptionMixDataModule's training batches "
            "are single-task; do not mix the two datasets in one batch."
        )


class SingleTaskBatches(ResumableOrder[list[int]]):
    """Batches of a ``ConcatDataset`` that each come from one of its datasets: every dataset is shuffled and cut
    into batches (of samples of similar length where lengths are given), then all batches are shuffled together, so
    tasks alternate in proportion to their sizes.

    Single-task batches weight the two tasks fairly: a BLIP-2 loss is the mean over a batch's label tokens, so in a
    mixed batch a one-word answer would weigh about ten times less than a ten-word caption. Grouping captions by
    length (Hugging Face's ``group_by_length``: sorted within shuffled mega-batches of up to 50 batches) pads them to
    about their own length rather than the longest (6% padding instead of 45% at batch 32 on the demo captions). VQA
    questions are about equally long and are not grouped: batches of equal-length questions are batches of one
    question type, and a demo BLIP-2 trained on them kept answering each type's most common answer. A run resumed
    mid-epoch goes on with the batches an uninterrupted run trains on next (:class:`ResumableOrder`).

    Args:
        lengths: for each concatenated dataset in order, either its number of samples (shuffled), or the length of
            each of its samples (any unit; grouped by length).
        batch_size: samples per batch (each dataset's last batch may be smaller).
        generator: seeds the shuffles.
    """

    def __init__(self, lengths: Sequence[int | Sequence[int]], batch_size: int, generator: torch.Generator) -> None:
        super().__init__(generator)
        self.lengths = lengths
        self.batch_size = batch_size

    def __len__(self) -> int:
        return sum(-(-_size(part) // self.batch_size) for part in self.lengths)

    @override
    def _draw(self, generator: torch.Generator) -> list[list[int]]:
        batches, offset = [], 0
        for part in self.lengths:
            if isinstance(part, int):
                order = torch.randperm(part, generator=generator).tolist()
            else:  # mega-batches are whole batches, so consecutive slices never straddle two of them
                order = get_length_grouped_indices(part, self.batch_size, generator=generator)
            order = [offset + index for index in order]
            batches += [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
            offset += _size(part)
        return [batches[index] for index in torch.randperm(len(batches), generator=generator).tolist()]


def _size(part: int | Sequence[int]) -> int:
    return part if isinstance(part, int) else len(part)


class PreprocessedImages(ImageSampleDataset):
    """The samples of an :class:`~ecoflap_pl.datamodules.base.ImageSampleDataset` (one image each), with
    ``"pixel_values"`` in place of the PIL ``"image"``: each image file is read and preprocessed once, on first use,
    and then served from memory.

    Hand-written (a Hugging Face ``datasets.map`` would do it with a dependency more) because the demo trains for
    eight epochs over 2,000 small scenes: decoding them and running the image processor again every epoch cost a
    fifteenth of each CPU training step, while the pixels of the whole training set take 55 MB. ``cache`` may be
    shared by datasets of the same images (VQA and captions).

    Args:
        dataset: the raw samples.
        preprocess: ``[{"image": PIL image}] -> (1, 3, H, W)``, the model collator's own image processing
            (:meth:`~ecoflap_pl.tasks.prompt_encoder.PromptEncoder.pixel_values`).
        cache: pixels by image path.
    """

    def __init__(self, dataset: ImageSampleDataset, preprocess: Preprocess, cache: dict[str, torch.Tensor]) -> None:
        if any(len(sample.images) != 1 for sample in dataset.samples):
            raise ValueError("PreprocessedImages serves samples of one image each (COCO captions, VQAv2).")
        super().__init__(dataset.samples, dataset.image_hint)
        self.preprocess = preprocess
        self.cache = cache

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        (path,) = sample.images
        if path not in self.cache:
            image = load_image(path, sample.source, self.image_hint)
            self.cache[path] = self.preprocess([{"image": image}])[0]
        return {"pixel_values": self.cache[path], **sample.copy_fields()}


class VQACaptionMixDataModule(EcoflapDataModule):
    """VQAv2 training questions and COCO training captions of one COCO-layout folder, as one training split.

    Validation and test serve the VQAv2 splits. Files and sample dicts are those of
    :class:`~ecoflap_pl.datamodules.VQAv2DataModule` and :class:`~ecoflap_pl.datamodules.COCOCaptionDataModule`
    (their default splits); each training batch holds one task (:class:`SingleTaskBatches`). With ``preprocess``,
    training samples carry their images preprocessed once (:class:`PreprocessedImages`).

    Args:
        data_dir: a folder holding both datasets in their official layouts (the demo's ``coco`` folder).
        preprocess: the model's image processing, to cache the training pixels; ``None`` serves PIL images.
        **kwargs: batch_size, num_workers, collate_fn (a :class:`MultitaskCollator`), calibration_* and shuffle_seed.
    """

    def __init__(self, data_dir: str | Path, preprocess: Preprocess | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.vqa = VQAv2DataModule(data_dir)
        self.captions = COCOCaptionDataModule(data_dir)
        self.preprocess = preprocess

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        if stage != "train":
            return self.vqa.check_files(stage)
        return {**self.vqa.check_files("train"), **self.captions.check_files("train")}

    @override
    def _build(self, stage: Stage) -> Dataset[dict[str, Any]]:
        if stage != "train":
            return self.vqa.dataset(stage)
        parts = [
            cast(ImageSampleDataset, self.vqa.dataset("train")),
            cast(ImageSampleDataset, self.captions.dataset("train")),
        ]
        if self.preprocess is None:
            return ConcatDataset(parts)
        cache: dict[str, torch.Tensor] = {}
        return ConcatDataset([PreprocessedImages(part, self.preprocess, cache) for part in parts])

    @override
    def train_dataloader(self) -> ResumableLoader:
        train = cast(ConcatDataset, self.dataset("train"))
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        vqa, captions = (cast(ImageSampleDataset, part) for part in train.datasets)
        lengths: list[int | Sequence[int]] = [
            len(vqa),
            [len(sample.fields["text"].split()) for sample in captions.samples],
        ]
        batches = SingleTaskBatches(lengths, self.batch_size, torch.Generator().manual_seed(self.shuffle_seed + epoch))
        return ResumableLoader(
            train,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self._resolve_collate_fn(),
            trainer=self.trainer,
        )


def fit(task: EcoflapTask, datamodule: EcoflapDataModule, steps: int, seed: int, title: str) -> None:
    """Train ``task`` for ``steps`` optimizer steps with the ordinary Lightning ``Trainer`` (no validation, logger or
    checkpoints; one progress bar over the steps, headed ``title``), on one device of whatever accelerator is present.

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
            enable_progress_bar=False,
            callbacks=[StepBar(title)],
            default_root_dir=root,
        )
        trainer.fit(task, datamodule=datamodule)
    task.cpu().eval()
