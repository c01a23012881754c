"""A fine-tuning run interrupted mid-epoch and resumed from its checkpoint equals an uninterrupted one
(`datamodules/resumable.py`): same batches after the resume, same weights and masks at the end."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, default_collate
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.datamodules import EcoflapDataModule
from ecoflap_pl.datamodules.base import Stage
from ecoflap_pl.demo.training import SingleTaskBatches
from ecoflap_pl.tasks.step_seeds import STEP_SEED, base_step_seed
from tests.callbacks.callback_toys import FAST, ToyTask, toy_samples

SAMPLES, BATCH, STEPS = 20, 4, 12  # 5 batches an epoch: the runs end in their third epoch
NO_STATE = "holds no state of the training dataloader"


class IdData(EcoflapDataModule):
    """The toy samples, each with its index as ``"id"``, through the DataModule base's own dataloaders."""

    def __init__(self, num_workers: int = 0) -> None:
        super().__init__(
            ".", batch_size=BATCH, num_workers=num_workers, collate_fn=default_collate, calibration_batch_size=4
        )

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        return {}

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> Dataset[dict[str, Any]]:
        return [{**sample, "id": index} for index, sample in enumerate(toy_samples(SAMPLES))]  # type: ignore[return-value]


class Seen(Callback):
    """Appends the sample ids of every training batch to ``rank{N}.jsonl`` in ``directory``; stops the run (as a kill
    would) before step ``stop_at``."""

    def __init__(self, directory: Path, stop_at: int | None = None) -> None:
        self.directory = directory
        self.stop_at = stop_at

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.stop_at:
            raise _Stopped
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(batch["id"].tolist()) + "\n")


def _ids(directory: Path, rank: int = 0) -> list[list[int]]:
    """The sample ids of the batches that the runs in ``directory`` trained on, on ``rank``, in order."""
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


class _Stopped(Exception):
    pass


EVERY_STEP = {"every_n_train_steps": 1, "save_top_k": 0, "save_last": True}
"""The ``ModelCheckpoint`` of the runs: a checkpoint at every step, the last one ``last.ckpt``."""


def _fit(
    root: Path,
    num_workers: int,
    stop_at: int | None = None,
    ckpt_path: Path | None = None,
    checkpoint: dict[str, Any] = EVERY_STEP,
    task_class: type[ToyTask] = ToyTask,
    **trainer: Any,
) -> tuple:
    """One fit of the pruned toy task, in ``root``, for ``STEPS`` steps (within 3 epochs, as the experiment files set
    ``max_epochs``: the task's schedule then builds the training dataloader before the checkpoint is restored), with a
    ``ModelCheckpoint(**checkpoint)``; returns its weights and masks (the weights only, where spawned)."""
    root.mkdir(parents=True, exist_ok=True)
    task, pruning = task_class(), ECoFLaPPruning(**FAST)
    trainer.setdefault("max_epochs", 3)
    trainer.setdefault("max_steps", STEPS)
    trainer.setdefault("limit_val_batches", 0)
    run = pl.Trainer(
        callbacks=[pruning, Seen(root, stop_at), ModelCheckpoint(dirpath=root, **checkpoint)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **trainer,
    )
    try:
        run.fit(task, datamodule=IdData(num_workers), ckpt_path=ckpt_path)
    except Exception as error:  # under ddp_spawn, the workers' error comes back as another type
        if "_Stopped" not in repr(error) and not isinstance(error, _Stopped):
            raise
    weights = {name: value.clone() for name, value in task.state_dict().items()}
    return weights, pruning.state_dict().get("masks")


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


@pytest.mark.parametrize(
    ("num_workers", "stop_at", "max_epochs"),
    [(0, 3, 3), (0, 5, 3), (0, 7, 3), (2, 3, 3), (2, 5, 3), (2, 7, 3), (0, 7, -1), (2, 7, -1)],
    ids=lambda value: str(value),
)
def test_a_fit_resumed_mid_epoch_equals_an_uninterrupted_one(
    tmp_path: Path, num_workers: int, stop_at: int, max_epochs: int
) -> None:
    """Stopped mid first epoch, at the end of it or mid second epoch; with ``max_epochs`` -1 the schedule needs no
    dataloader before the restore."""
    weights, masks = _fit(tmp_path / "whole", num_workers, max_epochs=max_epochs)
    _fit(tmp_path / "cut", num_workers, stop_at=stop_at, max_epochs=max_epochs)
    before = _ids(tmp_path / "cut")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, resumed_masks = _fit(
            tmp_path / "cut", num_workers, ckpt_path=tmp_path / "cut/last.ckpt", max_epochs=max_epochs
        )

    assert len(_ids(tmp_path / "whole")) == STEPS and len(before) == stop_at
    assert _ids(tmp_path / "cut") == _ids(tmp_path / "whole")  # no batch seen twice, none left out, in order
    assert _same(resumed, weights)
    assert _same(resumed_masks, masks)
    assert not [warning for warning in caught if NO_STATE in str(warning.message)]


EPOCH_END = {"save_last": True}
"""Lightning's default ``ModelCheckpoint``: a checkpoint at the end of each epoch (after validation, where it runs)."""
ON_VAL_LOSS = {"save_last": True, "monitor": "val/loss"}


@pytest.mark.parametrize(
    ("checkpoint", "stop_at", "trainer"),
    [
        (EPOCH_END, 5, {}),
        (EPOCH_END, 12, {}),
        (EPOCH_END, 7, {"num_workers": 2}),
        (ON_VAL_LOSS, 7, {"limit_val_batches": 2}),
        (EPOCH_END, 7, {"max_steps": STEPS}),
        (ON_VAL_LOSS, 7, {"limit_val_batches": 2, "max_steps": STEPS}),
        (ON_VAL_LOSS, 3, {"limit_val_batches": 2, "val_check_interval": 0.5}),
        (EPOCH_END, 4, {"limit_train_batches": 3}),
        (EVERY_STEP, 3, {"limit_train_batches": 3, "num_workers": 2}),
        (EVERY_STEP, 6, {"limit_train_batches": 0.6}),
        (EVERY_STEP, 5, {"reload_dataloaders_every_n_epochs": 1}),
        (EVERY_STEP, 5, {"accumulate_grad_batches": 2}),
    ],
    ids=[
        "epoch-end",
        "second-epoch-end",
        "epoch-end-2-workers",
        "epoch-end-after-validation",
        "epoch-end-max-steps",
        "epoch-end-after-validation-max-steps",
        "mid-epoch-validation",
        "limited-epoch-end",
        "limited-last-batch-2-workers",
        "limited-fraction-last-batch",
        "reloaded-each-epoch",
        "accumulated-step",
    ],
)
def test_a_fit_of_epochs_resumed_from_any_checkpoint_equals_an_uninterrupted_one(
    tmp_path: Path, checkpoint: dict[str, Any], stop_at: int, trainer: dict[str, Any]
) -> None:
    """Runs of ``max_epochs`` 3, as the experiment files (no ``max_steps``, unless set), killed before step ``stop_at``
    and resumed from ``last.ckpt``: at the end of an epoch (Lightning's default ``ModelCheckpoint``, with and without
    validation, and with ``max_steps``, which Lightning restarts inside the epoch), at an epoch that
    ``limit_train_batches`` ends early, at a validation mid-epoch, with the dataloader built again each epoch, on an
    optimizer step of ``accumulate_grad_batches``."""
    num_workers = trainer.pop("num_workers", 0)
    settings = {"checkpoint": checkpoint, "max_steps": -1, **trainer}
    weights, masks = _fit(tmp_path / "whole", num_workers, **settings)
    _fit(tmp_path / "cut", num_workers, stop_at=stop_at, **settings)
    before = len(_ids(tmp_path / "cut"))
    loops = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)["loops"]["fit_loop"]
    trained = loops["epoch_loop.batch_progress"]["total"]["processed"]  # the batches the checkpoint holds
    resumed, resumed_masks = _fit(tmp_path / "cut", num_workers, ckpt_path=tmp_path / "cut/last.ckpt", **settings)

    whole = _ids(tmp_path / "whole")
    after = _ids(tmp_path / "cut")[before:]
    assert 0 < trained <= before < len(whole)
    assert after == whole[trained:]  # the next batches of the uninterrupted run, none replayed, none left out
    assert _same(resumed, weights)
    assert _same(resumed_masks, masks)


def test_a_checkpoint_between_two_accumulated_steps_resumes_with_a_warning(tmp_path: Path) -> None:
    """The gradients of the batches since the last optimizer step are in no checkpoint: the weights cannot equal an
    uninterrupted run's, and the run says so."""
    settings = {"checkpoint": ON_VAL_LOSS, "accumulate_grad_batches": 2, "val_check_interval": 3}
    _fit(tmp_path / "cut", 0, stop_at=2, limit_val_batches=2, **settings)  # saved at the validation after batch 3

    with pytest.warns(UserWarning, match="after 3 batches of its epoch, between two optimizer steps") as caught:
        _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", limit_val_batches=2, **settings)

    assert len([warning for warning in caught if "between two optimizer steps" in str(warning.message)]) == 1


def test_the_calibration_subset_does_not_depend_on_the_training_order() -> None:
    """Pruning at the start of a fit reads the same samples whatever the training dataloader has served or restored."""

    def calibration_ids(data: IdData) -> list[int]:
        return [index for batch in data.calibration_dataloader(8) for index in batch["id"].tolist()]

    data = IdData()
    before = calibration_ids(data)
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    restored = IdData()
    restored.train_dataloader().load_state_dict(state)

    assert calibration_ids(data) == before == calibration_ids(restored)
    assert sorted(before) == sorted(set(before)) and len(before) == 8


@pytest.mark.distributed
def test_a_fit_resumed_mid_epoch_under_ddp_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    ddp = {"strategy": "ddp_spawn", "devices": 2, "accelerator": "cpu"}
    weights, _ = _fit(tmp_path / "whole", 0, **ddp)
    _fit(tmp_path / "cut", 0, stop_at=4, **ddp)
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", **ddp)

    shards = [_ids(tmp_path / "whole", rank) for rank in (0, 1)]
    assert [_ids(tmp_path / "cut", rank) for rank in (0, 1)] == shards
    first_epoch = [index for shard in shards for batch in shard[:3] for index in batch]  # 10 samples a rank: 3 batches
    assert sorted(first_epoch) == list(range(SAMPLES))  # each rank its own share, every sample once
    assert _same(resumed, weights)


class RandomStep(ToyTask):
    """A training step that draws from every global generator, as dropout (torch) and timm's augmentations (Python's
    ``random``, NumPy) do."""

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = F.dropout(self.model(batch["pixels"], batch["tokens"]), p=0.5, training=True)
        scale = 1.0 + random.random() + float(np.random.rand())
        return F.cross_entropy(logits * scale, batch["labels"])


@pytest.mark.parametrize(
    ("checkpoint", "stop_at"),
    [(EVERY_STEP, 3), (EVERY_STEP, 7), (EPOCH_END, 7)],
    ids=["mid-epoch", "mid-second-epoch", "epoch-end"],
)
def test_a_resumed_fit_draws_the_dropout_and_augmentation_of_an_uninterrupted_one(
    tmp_path: Path, checkpoint: dict[str, Any], stop_at: int
) -> None:
    """Each run starts as the command does, with ``seed_everything``; the resumed run's generators start where the
    uninterrupted run's were at step 0, not at step ``stop_at``."""
    settings = {"checkpoint": checkpoint, "task_class": RandomStep}
    pl.seed_everything(0, verbose=False)
    weights, _ = _fit(tmp_path / "whole", 0, **settings)
    pl.seed_everything(0, verbose=False)
    _fit(tmp_path / "cut", 0, stop_at=stop_at, **settings)
    pl.seed_everything(0, verbose=False)
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", **settings)
    pl.seed_everything(1, verbose=False)
    other, _ = _fit(tmp_path / "other", 0, **settings)

    assert _same(resumed, weights)
    assert not _same(other, weights)  # the draws change the weights: another seed trains others


def test_a_resumed_fit_goes_on_with_the_random_seed_its_run_started_with(tmp_path: Path) -> None:
    """Without ``seed_everything`` (or with another seed when resuming: LightningCLI's default draws one), the base
    seed is the one kept in the checkpoint."""
    os.environ.pop("PL_GLOBAL_SEED", None)
    _fit(tmp_path / "cut", 0, stop_at=3, task_class=RandomStep)
    base = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)[STEP_SEED]
    os.environ["PL_GLOBAL_SEED"] = str(base)
    weights, _ = _fit(tmp_path / "whole", 0, task_class=RandomStep)
    pl.seed_everything(123, verbose=False)
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", task_class=RandomStep)

    assert _same(resumed, weights)


@pytest.mark.parametrize(("environment", "expected"), [("7", 7), ("abc", None), ("", None)])
def test_the_base_seed_is_seed_everything_s_or_one_drawn_from_torch_s_generator(
    environment: str, expected: int | None
) -> None:
    """A ``PL_GLOBAL_SEED`` that ``seed_everything`` would not take either is not a seed: the draw decides, which
    ``torch.manual_seed`` alone makes reproducible."""
    os.environ["PL_GLOBAL_SEED"] = environment
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    torch.manual_seed(0)
    first = base_step_seed(trainer, None)
    torch.manual_seed(0)

    assert first == base_step_seed(trainer, None) == (expected if expected is not None else first)
    assert base_step_seed(trainer, restored=5) == 5  # a checkpoint's seed goes first


@pytest.mark.parametrize("seed", ["x", -1, 1.5])
def test_a_checkpoint_whose_base_seed_was_changed_is_refused_before_training(tmp_path: Path, seed: Any) -> None:
    _fit(tmp_path / "cut", 0, stop_at=3, task_class=RandomStep)
    checkpoint = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)
    checkpoint[STEP_SEED] = seed
    torch.save(checkpoint, tmp_path / "changed.ckpt")

    with pytest.raises(ValueError, match=f"`{STEP_SEED}` is {seed!r}, not the non-negative integer .* HINT: resume"):
        _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "changed.ckpt", task_class=RandomStep)
    assert len(_ids(tmp_path / "cut")) == 3  # no step trained


@pytest.mark.distributed
def test_a_resumed_fit_under_ddp_draws_the_dropout_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """Each rank seeds its steps with its rank; rank 0's base seed is every rank's."""
    settings = {"strategy": "ddp_spawn", "devices": 2, "accelerator": "cpu", "task_class": RandomStep}
    os.environ.pop("PL_GLOBAL_SEED", None)
    _fit(tmp_path / "cut", 0, stop_at=4, **settings)
    os.environ["PL_GLOBAL_SEED"] = str(torch.load(tmp_path / "cut/last.ckpt", weights_only=False)[STEP_SEED])
    weights, _ = _fit(tmp_path / "whole", 0, **settings)
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", **settings)

    assert _same(resumed, weights)


class OwnSchedule(ToyTask):
    """A task with a ``configure_optimizers`` of its own whose schedule lasts ``trainer.estimated_stepping_batches``, as
    Lightning's documentation shows for ``OneCycleLR``."""

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=steps)}


def test_a_task_with_its_own_schedule_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """Its schedule built the training dataloader before the restore, and only `EcoflapTask.configure_optimizers`
    dropped that loader: the resumed epoch started from its first batch again, without a warning."""
    weights, _ = _fit(tmp_path / "whole", 0, task_class=OwnSchedule)
    _fit(tmp_path / "cut", 0, stop_at=3, task_class=OwnSchedule)
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", task_class=OwnSchedule)

    assert _ids(tmp_path / "cut") == _ids(tmp_path / "whole")
    assert _same(resumed, weights)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_cut_short_by_limit_train_batches_is_followed_by_a_new_order_after_a_resume(
    tmp_path: Path, num_workers: int
) -> None:
    """`limit_train_batches` 3 of 5: a run resumed from the last batch of its first epoch went on with the two batches
    left of that epoch's order, where the uninterrupted run drew the second epoch's."""
    limited = {"limit_train_batches": 3, "max_epochs": 5}
    weights, _ = _fit(tmp_path / "whole", num_workers, **limited)
    _fit(tmp_path / "cut", num_workers, stop_at=3, **limited)
    resumed, _ = _fit(tmp_path / "cut", num_workers, ckpt_path=tmp_path / "cut/last.ckpt", **limited)

    assert _ids(tmp_path / "cut") == _ids(tmp_path / "whole")
    assert _same(resumed, weights)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("checkpoint", "stop_at", "trainer"),
    [(EPOCH_END, 4, {}), (EVERY_STEP, 2, {"limit_train_batches": 2})],
    ids=["epoch-end", "limited-last-batch"],
)
def test_a_fit_of_epochs_under_ddp_resumed_after_an_epoch_s_end_equals_an_uninterrupted_one(
    tmp_path: Path, checkpoint: dict[str, Any], stop_at: int, trainer: dict[str, Any]
) -> None:
    """3 batches a rank an epoch (2 with the limit): resumed from the end of the first epoch."""
    settings = {"checkpoint": checkpoint, "max_steps": -1, "strategy": "ddp_spawn", "devices": 2, "accelerator": "cpu"}
    weights, _ = _fit(tmp_path / "whole", 0, **settings, **trainer)
    _fit(tmp_path / "cut", 0, stop_at=stop_at, **settings, **trainer)
    before = [len(_ids(tmp_path / "cut", rank)) for rank in (0, 1)]
    loops = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)["loops"]["fit_loop"]
    trained = loops["epoch_loop.batch_progress"]["total"]["processed"]
    resumed, _ = _fit(tmp_path / "cut", 0, ckpt_path=tmp_path / "cut/last.ckpt", **settings, **trainer)

    for rank in (0, 1):
        assert _ids(tmp_path / "cut", rank)[before[rank] :] == _ids(tmp_path / "whole", rank)[trained:]
    assert _same(resumed, weights)


def test_a_checkpoint_without_loader_state_resumes_from_the_start_of_the_epoch_with_a_warning(tmp_path: Path) -> None:
    _fit(tmp_path / "whole", 0)
    _fit(tmp_path / "cut", 0, stop_at=3)
    old = tmp_path / "cut/old.ckpt"
    checkpoint = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # as written before the loader kept state
    torch.save(checkpoint, old)

    with pytest.warns(UserWarning, match=f"{NO_STATE} .* after 3 batches goes on from the first batch") as caught:
        _fit(tmp_path / "cut", 0, ckpt_path=old)

    assert len([warning for warning in caught if NO_STATE in str(warning.message)]) == 1
    after = _ids(tmp_path / "cut")[3:]
    assert after[0] == _ids(tmp_path / "whole")[0]  # the epoch's order starts again
    assert len(after) == STEPS - 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_epoch_of_an_uninterrupted_run_keeps_the_order_of_a_shuffling_dataloader(num_workers: int) -> None:
    """The order of ``DataLoader(shuffle=True, generator=...)``, which the training dataloader replaced, in the first
    epoch and the next ones (the demo ViT trains 16 epochs on one dataloader: its cached weights hold its order)."""
    data = IdData(num_workers)
    loader = data.train_dataloader()
    generator = torch.Generator().manual_seed(data.shuffle_seed)
    shuffled = DataLoader(data.dataset("train"), batch_size=BATCH, shuffle=True, generator=generator)

    assert [[batch["id"].tolist() for batch in loader] for _ in range(3)] == [
        [batch["id"].tolist() for batch in shuffled] for _ in range(3)
    ]


def test_a_checkpoint_without_loader_state_at_an_epoch_s_end_resumes_with_a_warning(tmp_path: Path) -> None:
    """Without the state, the loader is built while ``current_epoch`` still names the epoch that ended: the next epoch
    trains on the first epoch's order again."""
    settings = {"checkpoint": EPOCH_END, "max_steps": -1}
    _fit(tmp_path / "whole", 0, **settings)
    _fit(tmp_path / "cut", 0, stop_at=7, **settings)  # last.ckpt: the end of the first epoch
    before = len(_ids(tmp_path / "cut"))
    old = tmp_path / "cut/old.ckpt"
    checkpoint = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # as written before the loader kept state
    torch.save(checkpoint, old)

    with pytest.warns(UserWarning, match="holds no state .* the epochs after it are not shuffled as an") as caught:
        _fit(tmp_path / "cut", 0, ckpt_path=old, **settings)

    assert len([warning for warning in caught if NO_STATE in str(warning.message)]) == 1
    whole = _ids(tmp_path / "whole")
    assert _ids(tmp_path / "cut")[before:][:5] == whole[:5] != whole[5:10]


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
