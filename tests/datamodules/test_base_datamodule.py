"""What every DataModule shares: calibration subsets, the training shuffle, collate_fn resolution, the CLI view."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from typing_extensions import override

from ecoflap_pl.datamodules import (
    COCOCaptionDataModule,
    DataFileNotFoundError,
    EcoflapDataModule,
    Flickr30kDataModule,
    ImageNetDataModule,
    ImageTextPairsDataModule,
    NLVR2DataModule,
    VQAv2DataModule,
)
from tests.datamodules.datamodule_layouts import collate
from tests.trainers import quiet_trainer


def _texts(loader) -> list[str]:
    return [sample["text"] for batch in loader for sample in batch]


def test_calibration_is_a_seeded_fixed_subset_of_train(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, calibration_batch_size=3)
    loader = dm.calibration_dataloader(7)
    assert [len(batch) for batch in loader] == [3, 3, 1]
    first = _texts(loader)
    assert first == _texts(loader)  # no shuffling between passes
    again = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, calibration_batch_size=3)
    assert _texts(again.calibration_dataloader(7)) == first  # same seed, same samples
    assert len(set(first)) == 7 and set(first) <= {f"pair number {i}" for i in range(10)}
    assert _texts(dm.calibration_dataloader(4)) == first[:4]  # a smaller request is a prefix
    other = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, calibration_seed=1)
    assert _texts(other.calibration_dataloader(7)) != first


def test_calibration_default_size_and_cap(pairs_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, calibration_samples=5)
    assert sum(len(b) for b in dm.calibration_dataloader()) == 5
    assert dm.calibration_dataloader().batch_size == 8
    with caplog.at_level(logging.DEBUG):
        assert sum(len(b) for b in dm.calibration_dataloader(128)) == 10
    # Logged at DEBUG only: prune() warns once for the short set, naming the options to lower.
    assert [record.levelno for record in caplog.records if "training split has 10" in record.message] == [logging.DEBUG]
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 1, got 0"):
        dm.calibration_dataloader(0)


def test_calibration_uses_training_style_samples(coco_karpathy: Path, vqa_root: Path, nlvr2_root: Path) -> None:
    coco = COCOCaptionDataModule(coco_karpathy, collate_fn=collate, calibration_samples=4)
    assert all(set(s) == {"image", "image_id", "text"} for b in coco.calibration_dataloader() for s in b)
    vqa = VQAv2DataModule(vqa_root, collate_fn=collate)
    assert {s["question_id"] for b in vqa.calibration_dataloader(3) for s in b} == {10, 11, 20}
    nlvr2 = NLVR2DataModule(nlvr2_root, collate_fn=collate)
    assert {s["identifier"][:5] for b in nlvr2.calibration_dataloader(2) for s in b} == {"train"}


def test_train_shuffle_is_seeded(pairs_root: Path) -> None:
    def order(seed: int) -> list[str]:
        dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, batch_size=4, shuffle_seed=seed)
        return _texts(dm.train_dataloader())

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(f"pair number {i}" for i in range(10))


def test_missing_collate_fn_is_a_clear_error(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json")
    with pytest.raises(RuntimeError, match="no `collate_fn`.*HINT: pass `collate_fn=task.collator`"):
        dm.calibration_dataloader()
    with pytest.raises(TypeError, match="`collate_fn` must be callable"):
        ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn="collate")


class _Collator:
    """Turns pair samples into a tensor batch, as a task's collator would."""

    def __call__(self, samples: list[dict]) -> dict:
        images = torch.stack([torch.tensor(list(s["image"].getdata()), dtype=torch.float32) for s in samples])
        return {"pixels": images, "text": [s["text"] for s in samples]}


class _TinyTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.collator = _Collator()
        self.seen: list[str] = []

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.extend(batch["text"])
        return self.layer(batch["pixels"] / 255).mean()

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen.extend(batch["text"])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_uses_the_task_collator(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", val_file="cc3m.json", batch_size=4)
    task = _TinyTask()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert len(task.seen) == 4 + 4 + 4
    assert sum(len(b["text"]) for b in dm.calibration_dataloader(6)) == 6


def test_workers_load_samples(pairs_root: Path) -> None:
    dm = ImageTextPairsDataModule(pairs_root, "cc3m.json", collate_fn=collate, num_workers=1, batch_size=5)
    assert sorted(_texts(dm.train_dataloader())) == sorted(f"pair number {i}" for i in range(10))


@pytest.mark.parametrize(
    "cls",
    [
        COCOCaptionDataModule,
        Flickr30kDataModule,
        VQAv2DataModule,
        NLVR2DataModule,
        ImageNetDataModule,
        ImageTextPairsDataModule,
    ],
)
def test_cli_sees_every_argument(cls: type[EcoflapDataModule]) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    options = {action.dest for action in parser._actions}
    common = ("data_dir", "batch_size", "num_workers", "collate_fn", "calibration_samples", "calibration_batch_size")
    assert {f"data.{name}" for name in (*common, "calibration_seed", "shuffle_seed")} <= options


def test_hparams_are_saved_without_collate_fn(vqa_root: Path) -> None:
    dm = VQAv2DataModule(vqa_root, collate_fn=collate, batch_size=3, questions_prefix="OpenEnded_mscoco")
    assert dm.hparams["batch_size"] == 3 and dm.hparams["questions_prefix"] == "OpenEnded_mscoco"
    assert "collate_fn" not in dm.hparams


def test_splits_read_by_a_datamodule_are_reused_by_the_same_datamodule_only(vqa_root: Path) -> None:
    checked = VQAv2DataModule(vqa_root)
    val = checked.dataset("val")
    same = VQAv2DataModule(vqa_root, collate_fn=collate)  # the collator does not change what is read
    same.reuse_splits(checked)
    other = VQAv2DataModule(vqa_root, val_split="train2014")
    other.reuse_splits(checked)
    (vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    assert same.dataset("val") is val  # not read again
    with pytest.raises(DataFileNotFoundError, match="HINT: set `val_questions_file`"):
        VQAv2DataModule(vqa_root).dataset("val")
    assert other.dataset("val") is not val  # another split: read from its own files
