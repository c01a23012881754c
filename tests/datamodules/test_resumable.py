"""A fine-tuning run interrupted mid-epoch and resumed from its checkpoint equals an uninterrupted one
(`datamodules/resumable.py`): same batches after the resume, same weights and masks at the end."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset, default_collate
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.datamodules import EcoflapDataModule
from ecoflap_pl.datamodules.base import Stage
from ecoflap_pl.demo.training import SingleTaskBatches
from tests.callbacks.callback_toys import FAST, ToyTask, toy_samples

SAMPLES, BATCH, STEPS = 20, 4, 12  # 5 batches an epoch: the runs end in their third epoch
NO_STATE = "holds no state of the training dataloader"


class IdData(EcoflapDataModule):
    """The toy samples, each with its index as ``"id"``, through the DataModule base's own dataloaders."""

    def __init__(self, num_workers: int = 0) -> None:
        super().__init__(".", batch_size=BATCH, num_workers=num_workers, collate_fn=default_collate)

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        return {}

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> Dataset[dict[str, Any]]:
        return [{**sample, "id": index} for index, sample in enumerate(toy_samples(SAMPLES))]  # type: ignore[return-value]


class Seen(Callback):
    """Records the sample ids of every training batch; stops the run (as a kill would) before step ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.ids: list[list[int]] = []

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.stop_at:
            raise _Stopped
        self.ids.append(batch["id"].tolist())


class _Stopped(Exception):
    pass


def _fit(root: Path, num_workers: int, stop_at: int | None = None, ckpt_path: Path | None = None) -> tuple:
    """One fit of the pruned toy task; returns its weights, masks and the sample ids of its batches."""
    task, seen, pruning = ToyTask(), Seen(stop_at), ECoFLaPPruning(**FAST)
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[pruning, seen, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    try:
        trainer.fit(task, datamodule=IdData(num_workers), ckpt_path=ckpt_path)
    except _Stopped:
        pass
    weights = {name: value.clone() for name, value in task.state_dict().items()}
    return weights, pruning.state_dict()["masks"], seen.ids


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 5, 7], ids=["mid-first-epoch", "epoch-end", "mid-second-epoch"])
def test_a_fit_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path: Path, num_workers: int, stop_at: int) -> None:
    weights, masks, ids = _fit(tmp_path / "whole", num_workers)
    _, _, ids_before = _fit(tmp_path / "cut", num_workers, stop_at=stop_at)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, resumed_masks, ids_after = _fit(tmp_path / "cut", num_workers, ckpt_path=tmp_path / "cut/last.ckpt")

    assert len(ids) == STEPS and len(ids_before) == stop_at
    assert ids_before + ids_after == ids  # no batch seen twice, none left out, in the same order
    assert _same(resumed, weights)
    assert _same(resumed_masks, masks)
    assert not [warning for warning in caught if NO_STATE in str(warning.message)]


def test_a_checkpoint_without_loader_state_resumes_from_the_start_of_the_epoch_with_a_warning(tmp_path: Path) -> None:
    _, _, ids = _fit(tmp_path / "whole", 0)
    _fit(tmp_path / "cut", 0, stop_at=3)
    old = tmp_path / "cut/old.ckpt"
    checkpoint = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # as written before the loader kept state
    torch.save(checkpoint, old)

    with pytest.warns(UserWarning, match=f"{NO_STATE} .* after 3 batches goes on from the first batch") as caught:
        _, _, ids_after = _fit(tmp_path / "cut", 0, ckpt_path=old)

    assert len([warning for warning in caught if NO_STATE in str(warning.message)]) == 1
    assert ids_after[0] == ids[0]  # the epoch's order starts again
    assert len(ids_after) == STEPS - 3


def test_single_task_batches_go_on_from_a_state_mid_epoch_and_at_its_end() -> None:
    def batches() -> SingleTaskBatches:
        return SingleTaskBatches([10, [3, 1, 4, 1, 5, 9, 2]], 3, torch.Generator().manual_seed(0))

    whole = batches()
    first, second = list(whole), list(whole)
    cut = batches()
    iterator = iter(cut)
    seen = [next(iterator) for _ in range(2)]
    state = cut.state_dict()
    list(iterator)
    at_end = cut.state_dict()

    resumed = batches()
    resumed.load_state_dict(state)
    assert seen + list(resumed) == first
    next_epoch = batches()
    next_epoch.load_state_dict(at_end)
    assert list(next_epoch) == second
