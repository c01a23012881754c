"""The plain Dataset every DataModule serves, and the DataModule base holding dataloaders and calibration."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from typing_extensions import override

from ecoflap_pl.datamodules._io import DataFileNotFoundError, DataFormatError, check_image_files, load_image, locate
from ecoflap_pl.datamodules.resumable import EpochDistributedSampler, ResumableLoader, ShuffledIndices
from ecoflap_pl.folders import first_subfolders

log = logging.getLogger(__name__)

NEARBY_FOLDERS = 32
"""How many folders inside a wrong ``data_dir`` are searched for the dataset's files (the first, by name)."""

Stage = Literal["train", "val", "test"]
CollateFn = Callable[[list[dict[str, Any]]], Any]


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample before its images are read.

    Attributes:
        images: image file paths; one for ``"image"``, two (left, right) for ``"images"``.
        fields: every other key of the sample dict.
        source: the annotation it comes from, named in image errors (``"image_id 5 in /data/x.json"``).
        image_key: ``"image"`` (a single PIL image) or ``"images"`` (a list of PIL images).
    """

    images: tuple[str, ...]
    fields: dict[str, Any]
    source: str
    image_key: str = field(default="image")

    def copy_fields(self) -> dict[str, Any]:
        """The annotation fields as a new dict, list values copied (a collator may change them in place)."""
        return {key: list(value) if isinstance(value, list) else value for key, value in self.fields.items()}


class ImageSampleDataset(Dataset[dict[str, Any]]):
    """A map-style Dataset of RAW sample dicts: PIL RGB images plus the annotation fields, nothing resized.

    Args:
        samples: the samples, as read from the annotation files.
        image_hint: what sets the image folder; appended to image errors.
    """

    def __init__(self, samples: Sequence[Sample], image_hint: str = "") -> None:
        self.samples = samples
        self.image_hint = image_hint

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        images = [load_image(path, sample.source, self.image_hint) for path in sample.images]
        out: dict[str, Any] = {sample.image_key: images if sample.image_key == "images" else images[0]}
        out.update(sample.copy_fields())
        return out


def checked_image_dataset(samples: Sequence[Sample], option: str, image_hint: str) -> ImageSampleDataset:
    """The :class:`ImageSampleDataset` of ``samples``, once every image file they reference is found to exist.

    Only existence is checked (:func:`~ecoflap_pl.datamodules._io.check_image_files`: one listing per folder); an
    image that exists but cannot be decoded is reported when its sample is read.

    Args:
        samples: the samples read from the split's annotation files.
        option: the DataModule option that sets their image folder (``"image_root"``).
        image_hint: what sets the image folder; the ``HINT`` of the errors.

    Raises:
        DataFileNotFoundError: an image folder or file is missing (how many of how many, up to three with the
            annotation that references each).
    """
    check_image_files(((path, sample.source) for sample in samples for path in sample.images), option, image_hint)
    return ImageSampleDataset(samples, image_hint)


class EcoflapDataModule(pl.LightningDataModule):
    """Dataloaders and the calibration subset, common to every ecoflap-pl DataModule.

    Subclasses only read their files, in two steps for the ``"train"``, ``"val"`` or ``"test"`` loop (predict serves
    the test Dataset): ``_locate(stage)`` finds the annotation or list files of the split serving the loop, and the
    image folders it knows without reading them, by the option that sets each; ``_read(stage, files)`` reads them
    into its Dataset and checks that every image file the samples reference exists
    (:func:`checked_image_dataset`). :meth:`check_files` runs the first step alone, so that a missing file or image
    folder is reported before any long work; :meth:`dataset` runs both, once per split. The ``ecoflap`` command does
    both before it builds the model, so that a missing, damaged or malformed file or a missing image file is reported
    at once, and hands the splits read to the DataModule of the run (:meth:`reuse_splits`); used from Python, a split
    is read by ``setup`` (or when pruning asks for calibration batches), before any batch. Images are decoded lazily,
    per sample: an unreadable one is reported when its sample is read.

    Args:
        data_dir: root folder of the dataset in its official layout.
        batch_size: samples per batch in the train/val/test/predict dataloaders.
        num_workers: DataLoader worker processes.
        collate_fn: turns a list of sample dicts into a batch. When ``None``, the attached LightningModule's
            ``collator`` is used (the task's model-specific processing).
        calibration_samples: size of the calibration subset when ``calibration_dataloader()`` gets no size.
        calibration_batch_size: batch size of the calibration dataloader.
        calibration_seed: seed choosing the calibration subset of the training split.
        shuffle_seed: seed of the training shuffle (offset by the epoch when the dataloader is rebuilt).
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 32,
        num_workers: int = 0,
        collate_fn: CollateFn | None = None,
        calibration_samples: int = 128,
        calibration_batch_size: int = 8,
        calibration_seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["collate_fn"])
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("calibration_samples", calibration_samples, 1)
        _check_int("calibration_batch_size", calibration_batch_size, 1)
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"`collate_fn` must be callable or None, got {collate_fn!r}.")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.calibration_samples = calibration_samples
        self.calibration_batch_size = calibration_batch_size
        self.calibration_seed = calibration_seed
        self.shuffle_seed = shuffle_seed
        self._datasets: dict[Stage, Dataset[dict[str, Any]]] = {}

    def check_files(self, stage: Stage) -> dict[str, Path]:
        """Find, without reading them, the annotation or list files that the ``stage`` loop's split needs, and the
        image folders known from the options alone (``image_root``, VQAv2's ``{split}2014`` folder, NLVR2's split
        folder, ImageNet's split folder).

        Only file and folder names are looked up: no file is parsed, no image opened. It is the lookup that
        reading the split starts with, so the files it returns are the files the loop reads. Image files named by the
        annotations are checked when the split is read (:meth:`dataset`).

        Args:
            stage: ``"train"`` (also the calibration split), ``"val"`` or ``"test"`` (also predict).

        Returns:
            The files (or image folders) found, by the option that sets each, e.g. ``{"val_questions_file": path}``.

        Raises:
            DataFileNotFoundError: a file or folder is missing; the message names every path looked for, the option
                that sets it and a ``HINT``.
            ValueError: the loop needs a file option that is not set.
        """
        _check_stage(stage)
        try:
            return self._locate(stage)
        except DataFileNotFoundError as error:
            # The error's hint (set the file's option) misleads when the folder, not the file, is wrong.
            not_found, _, option_hint = str(error).partition(" HINT: ")
            nearby = self._data_dir_nearby(stage)
            if nearby is not None:
                raise DataFileNotFoundError(
                    f"{not_found} `data_dir` is {self.data_dir}, but the files of this split are in {nearby}. HINT: "
                    f"set data_dir: {nearby}"
                ) from error
            if not self.data_dir.exists() and str(self.data_dir) in not_found:
                raise DataFileNotFoundError(
                    f"{not_found} `data_dir` {self.data_dir} does not exist. HINT: set data_dir to the folder that "
                    f"holds the dataset (the experiment files mark it `# EDIT`), or {option_hint}"
                ) from error
            raise

    def _data_dir_nearby(self, stage: Stage) -> Path | None:
        """The folder one level above ``data_dir``, or one of the first :data:`NEARBY_FOLDERS` folders inside it, in
        which the files of the ``stage`` loop's split are all found (``data_dir`` set to the parent or a subfolder of
        the dataset's root), or ``None``. DataModules that choose their ``data_dir`` themselves are not searched."""
        if "data_dir" not in inspect.signature(type(self)).parameters:
            return None
        candidates = [self.data_dir.parent] if self.data_dir.parent != self.data_dir else []
        try:
            if self.data_dir.is_dir():
                candidates += first_subfolders(self.data_dir, NEARBY_FOLDERS)
        except OSError:  # a folder that cannot be listed: the error found is reported as it is
            pass
        arguments = _arguments(self)
        for candidate in candidates:
            try:
                type(self)(**{**arguments, "data_dir": candidate})._locate(stage)
            except (OSError, ValueError, TypeError):  # DataFileNotFoundError is an OSError
                continue
            return candidate
        return None

    def reuse_splits(self, other: EcoflapDataModule) -> None:
        """Serve the splits ``other`` has read (:meth:`dataset`) instead of reading them again, when ``other`` is the
        same DataModule: the same class built with the same arguments (``collate_fn`` aside, which reading ignores).

        The ``ecoflap`` command reads the splits of a run on a DataModule of its own before it builds the model (so
        that a damaged annotation file is reported at once), then hands them to the DataModule its parser builds
        after the model: each file is parsed once. A different DataModule is left alone (logged).
        """
        if type(other) is not type(self) or _arguments(other) != _arguments(self):
            log.debug("%s: not reusing the splits of %s, built with other arguments", type(self).__name__, other)
            return
        for stage, dataset in other._datasets.items():
            self._datasets.setdefault(stage, dataset)

    def _locate(self, stage: Stage) -> dict[str, Path]:
        """The files of the split serving ``stage``, by option, found but not read (:meth:`check_files`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _locate(stage).")

    def _read(self, stage: Stage, files: dict[str, Path]) -> Dataset[dict[str, Any]]:
        """The Dataset of the split serving ``stage``, read from ``files`` (what ``_locate(stage)`` found)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _read(stage, files).")

    def _build(self, stage: Stage) -> Dataset[dict[str, Any]]:
        """Locate, then read, the split serving ``stage``; a DataModule made of others overrides it and ``_locate``."""
        return self._read(stage, self._locate(stage))

    def _required_file(self, stage: Stage, file: str | None, what: str) -> tuple[Path, str]:
        """The file of the ``stage`` loop (option ``{stage}_file``, absolute or under ``data_dir``) and that option.

        Args:
            stage: the loop that reads it.
            file: the option's value.
            what: what the file holds, for the not-found error (``"image-text pairs"``).

        Raises:
            ValueError: when ``file`` is None.
        """
        option = f"{stage}_file"
        if file is None:
            raise ValueError(
                f"`{option}` must be set for the {stage} loop of {type(self).__name__}, got None. "
                + ("HINT: set it, or trainer `limit_val_batches: 0`." if stage == "val" else "HINT: set it.")
            )
        return locate(self.data_dir, file, [], option, f"{what} for the {stage} loop"), option

    def dataset(self, stage: Stage) -> Dataset[dict[str, Any]]:
        """The Dataset serving the ``"train"``, ``"val"`` or ``"test"`` loop, read once (its image files checked to
        exist) and cached."""
        _check_stage(stage)
        if stage not in self._datasets:
            dataset = self._build(stage)
            size = len(cast(Sized, dataset))
            if size == 0:
                role = "calibration and training" if stage == "train" else f"the {stage} loop"
                read = ", ".join(f"`{option}` {path}" for option, path in self._locate(stage).items())
                raise DataFormatError(
                    f"{type(self).__name__}: the split read for {role} has no samples (read from {read}). "
                    "Nothing would be pruned, trained or evaluated. HINT: check that its annotation file lists "
                    "samples and that the split options name the split you mean."
                )
            self._datasets[stage] = dataset
            log.debug("%s: the %s loop reads %d samples", type(self).__name__, stage, size)
        return self._datasets[stage]

    @override
    def setup(self, stage: str) -> None:
        """Read the annotation files of the Trainer stage's main loop and check that its image files exist (images
        are decoded lazily, per sample).

        ``fit`` reads the training split only: the validation split is read when the Trainer asks for its
        dataloader, so a run without validation (``limit_val_batches: 0``) needs no validation files.
        """
        main_loop: dict[str, Stage] = {
            TrainerFn.FITTING: "train",
            TrainerFn.VALIDATING: "val",
            TrainerFn.TESTING: "test",
            TrainerFn.PREDICTING: "test",
        }
        if stage in main_loop:
            self.dataset(main_loop[stage])

    @override
    def train_dataloader(self) -> ResumableLoader:
        """The shuffled training split, in a dataloader whose state Lightning keeps in every checkpoint, so that a run
        resumed mid-epoch goes on with the batches an uninterrupted run trains on next (:mod:`.resumable`).

        On one process the order is that of a ``DataLoader(shuffle=True)`` seeded with ``shuffle_seed`` plus the epoch
        it is built in; under several, each takes its share of an order seeded with ``shuffle_seed`` plus the epoch,
        as the ``DistributedSampler`` Lightning puts in a plain ``DataLoader``.
        """
        train = self.dataset("train")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler: Sampler[int]
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = EpochDistributedSampler(
                train, self.trainer.world_size, self.trainer.global_rank, self.shuffle_seed, epoch
            )
        else:
            sampler = ShuffledIndices(len(cast(Sized, train)), torch.Generator().manual_seed(self.shuffle_seed + epoch))
        return ResumableLoader(
            train,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._resolve_collate_fn(),
            # the workers' base seeds, drawn apart from the order (else from the global generator)
            generator=torch.Generator().manual_seed(self.shuffle_seed + epoch),
            trainer=self.trainer,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.batch_size)

    def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader:
        """A fixed, seeded subset of the training split for pruning calibration.

        The subset is the first ``num_samples`` of a permutation drawn with ``calibration_seed``, so a smaller
        request is a prefix of a larger one (ECoFLaP's coarse samples are among its fine samples). Batches of
        ``calibration_batch_size`` in that fixed order, no shuffling, the same ``collate_fn`` as training.

        Args:
            num_samples: subset size; ``None`` uses ``calibration_samples``. Capped at the split's size, logged at
                DEBUG only: :func:`~ecoflap_pl.pruning.prune` warns once when its steps get fewer samples than they
                ask for, naming the options to lower (a warning here too would say the same thing twice).
        """
        size = self.calibration_samples if num_samples is None else num_samples
        _check_int("num_samples", size, 1)
        train = self.dataset("train")
        available = len(cast(Sized, train))
        if size > available:
            log.debug("Calibration asked for %d samples; the training split has %d: using all.", size, available)
            size = available
        order = torch.randperm(available, generator=torch.Generator().manual_seed(self.calibration_seed))
        subset = Subset(train, order[:size].tolist())
        return self._loader(subset, self.calibration_batch_size)

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=self._resolve_collate_fn(),
        )

    def _resolve_collate_fn(self) -> CollateFn:
        if self.collate_fn is not None:
            return self.collate_fn
        module = self.trainer.lightning_module if self.trainer is not None else None
        collator = getattr(module, "collator", None)
        if collator is None:
            raise RuntimeError(
                f"{type(self).__name__} has no `collate_fn`: it must be set, or the DataModule must be attached "
                "to a Trainer whose LightningModule has a `collator`. HINT: pass `collate_fn=task.collator` "
                "when using the DataModule on its own (samples hold PIL images that torch cannot batch by itself)."
            )
        return collator


def _arguments(datamodule: EcoflapDataModule) -> dict[str, Any]:
    """The arguments ``datamodule`` was built with; LightningCLI's instantiator adds ``_class_path`` and
    ``_instantiator`` to the hyperparameters of the DataModule it builds."""
    return {key: value for key, value in datamodule.hparams.items() if not key.startswith("_")}


def _check_stage(stage: Any) -> None:
    if stage not in ("train", "val", "test"):
        raise ValueError(f"`stage` must be one of 'train', 'val', 'test', got {stage!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError naming ``name`` and the valid ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
