"""Fine-tuning that diverges (NaN or infinite values): stopped with a clear error, and ``save_to`` keeps the model as
pruned before fine-tuning instead of the broken one (see ``CASES.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask
from tests.robustness.cli_runs import folder_digest, run_ecoflap, vit_config
from tests.trainers import quiet_trainer


def test_a_learning_rate_that_makes_the_loss_nan_stops_fit_and_keeps_save_to(capsys, tmp_path, demo_data):
    """Lightning trains on with a NaN loss: the run ended with status 0 and save_to held NaN weights."""
    save_to = tmp_path / "pruned"
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(save_to))
    outcome = run_ecoflap(
        capsys,
        "fit",
        "-c",
        config,
        "--model.init_args.learning_rate=1e6",
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=0",
    )
    assert outcome.code == 2, outcome.text[-3000:]
    assert "error (FloatingPointError): Fine-tuning diverged at step" in outcome.text
    assert (
        "hold NaN or infinite values" in outcome.text and "HINT: lower `model.init_args.learning_rate`" in outcome.text
    )
    assert f"{save_to} holds the model as pruned BEFORE fine-tuning" in outcome.text
    weights = load_file(str(save_to / "model.safetensors"))
    assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
    assert json.loads((save_to / "pruning_report.json").read_text())["metadata"]["global_step"] == 0
    assert not list((tmp_path / "run").rglob("*.ckpt"))


class BreakAWeight(Callback):
    """Writes a NaN into a weight once training ends (as a buggy callback or a diverged bf16 run could)."""

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_weights_that_are_not_finite_are_never_written_over_save_to(tmp_path: Path) -> None:
    save_to = tmp_path / "pruned"
    pruning = ECoFLaPPruning(**FAST, save_to=str(save_to))
    trainer = quiet_trainer(
        max_steps=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[BreakAWeight(), pruning],
    )
    saved_after_pruning: dict[str, str] = {}

    class Snapshot(Callback):
        @override
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            saved_after_pruning.update(folder_digest(save_to))

    trainer.callbacks.append(Snapshot())
    with pytest.raises(
        FloatingPointError, match=rf"hold NaN or infinite values, so the model was not saved: {save_to}"
    ):
        trainer.fit(ToyTask(), datamodule=ToyData())
    assert saved_after_pruning and folder_digest(save_to) == saved_after_pruning


class StopAtStep(Callback):
    """Ends ``fit`` once ``step`` optimizer steps are taken, as ``max_time`` or early stopping would."""

    def __init__(self, step: int) -> None:
        self.step = step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        trainer.should_stop = trainer.global_step >= self.step


def test_training_without_a_known_number_of_steps_keeps_the_peak_rate_after_the_warm_up(tmp_path: Path) -> None:
    """The schedule took `int()` of an infinite step count: OverflowError in `configure_optimizers`, no step taken."""
    pruning = ECoFLaPPruning(**FAST)
    task = ToyTask(learning_rate=1e-2)
    task.warmup_steps = 2
    rates: list[float] = []

    class RecordRate(Callback):
        @override
        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: object) -> None:
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(
        max_steps=-1,
        max_epochs=-1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[pruning, RecordRate(), StopAtStep(4)],
    )
    with pytest.warns(UserWarning, match=r"number of training steps is unknown .* HINT: set `trainer.max_steps`"):
        trainer.fit(task, datamodule=ToyData())
    assert trainer.global_step == 4
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])
    params = dict(task.model.named_parameters())
    assert all(torch.count_nonzero(params[name].detach()[~mask]) == 0 for name, mask in pruning.masks.items())


class NaNLossFromStep(ToyTask):
    """A loss that turns NaN from the third batch on, as a bad sample or a broken forward would make it."""

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx >= 2 else loss


def test_a_loss_that_is_not_finite_under_a_grad_scaler_stops_fit_and_keeps_save_to(tmp_path: Path) -> None:
    """16-mixed's GradScaler skipped every step of a NaN loss: fit ended with no error after 8 skipped steps, and
    save_to was written as the model "fine-tuned to step 8"."""
    save_to = tmp_path / "pruned"
    pruning = ECoFLaPPruning(**FAST, save_to=str(save_to))
    trainer = quiet_trainer(
        # what `precision="16-mixed"` builds on a GPU; the scaler is given here so that the test runs on a CPU
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        max_steps=8,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[pruning],
    )
    with pytest.raises(
        FloatingPointError, match=r"diverged at epoch 0, batch 2: the training loss is NaN or infinite\..* HINT:"
    ):
        trainer.fit(NaNLossFromStep(), datamodule=ToyData())
    assert trainer.global_step == 3  # two steps taken, the third skipped by the scaler
    report = json.loads((save_to / "pruning_report.json").read_text())
    assert report["metadata"]["export"]["fine_tuned_to_step"] is None  # as pruned, before fine-tuning
    assert all(bool(torch.isfinite(tensor).all()) for tensor in load_file(str(save_to / "model.safetensors")).values())


def test_fp16_weights_with_clipped_gradients_fine_tune(tmp_path: Path) -> None:
    """The default AdamW kernel, taken whenever gradients were clipped, computes in the weights' dtype: its `eps`
    (1e-8) is 0 in fp16, so zero and small gradients gave NaN and infinite weights at the first step, whatever the
    learning rate, and the divergence check stopped the run with a HINT (lower the rate, clip) that could not help."""
    pruning = ECoFLaPPruning(**FAST)
    task = ToyTask(learning_rate=1e-5)
    dense = {name: param.detach().clone() for name, param in task.model.named_parameters()}
    trainer = quiet_trainer(
        precision="16-true",
        gradient_clip_val=0.5,
        max_steps=8,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[pruning],
    )
    trainer.fit(task, datamodule=ToyData())
    assert trainer.global_step == 8
    params = {name: param.detach() for name, param in task.model.named_parameters()}
    assert all(bool(torch.isfinite(param).all()) for param in params.values())
    assert all(torch.count_nonzero(params[name][~mask]) == 0 for name, mask in pruning.masks.items())
    assert any(not torch.equal(params[name][mask], dense[name][mask].half()) for name, mask in pruning.masks.items())
