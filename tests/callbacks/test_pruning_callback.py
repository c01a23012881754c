"""ECoFLaPPruning in real Trainer runs: prune once, masks fixed through fine-tuning, state across checkpoints."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, ModelSummary, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from typing_extensions import override

from ecoflap_pl import PruningConfig, PruningResult
from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.cli import EcoflapTrainer
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask, zero_fraction
from tests.trainers import quiet_trainer


def count_prunes(callback: ECoFLaPPruning, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spy on the callback's pruning worker: the list grows by the stage name on every real pruning run."""
    calls: list[str] = []
    original = callback._prune

    def spy(trainer, pl_module, stage):  # type: ignore[no-untyped-def]
        calls.append(stage)
        return original(trainer, pl_module, stage)

    monkeypatch.setattr(callback, "_prune", spy)
    return calls


def trainer(tmp_path: Path, callbacks: list, **overrides) -> pl.Trainer:  # type: ignore[type-arg]
    settings = dict(max_steps=4, default_root_dir=tmp_path, num_sanity_val_steps=1, limit_val_batches=1)
    return quiet_trainer(callbacks=callbacks, **{**settings, **overrides})


def assert_pruned_weights_zero(task: ToyTask, masks: dict[str, torch.Tensor]) -> None:
    params = dict(task.model.named_parameters())
    assert masks
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask.to(params[name].device)]) == 0, name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_prunes_once_before_sanity_check_and_keeps_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    callback = ECoFLaPPruning(**FAST)
    calls = count_prunes(callback, monkeypatch)
    task = ToyTask()
    dense = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    run = trainer(
        tmp_path,
        [callback],
        precision=precision,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    run.fit(task, datamodule=ToyData())

    assert calls == ["fit"] and callback.pruned
    assert task.sanity_zero_fraction == pytest.approx(0.5, abs=0.02)  # the sanity check already saw the pruned model
    assert_pruned_weights_zero(task, callback.masks)
    params = dict(task.model.named_parameters())
    kept_moved = any(not torch.equal(params[n][m], dense[n][m]) for n, m in callback.masks.items())
    assert kept_moved, "fine-tuning must still update the kept weights"
    assert 0.45 <= zero_fraction(task.model) <= 0.55
    log_dir = Path(run.log_dir)
    report = json.loads((log_dir / "pruning_report.json").read_text())
    assert report["metadata"]["stage"] == "fit" and report["config"]["sparsity"] == 0.5
    assert (log_dir / "pruning_sparsity.png").stat().st_size > 0
    metrics = (log_dir / "metrics.csv").read_text()
    assert "pruning/overall_sparsity" in metrics and "pruning/sparsity/vision" in metrics


def test_masks_hold_under_adamw_momentum_from_a_dense_optimizer_state(tmp_path: Path) -> None:
    """Even when AdamW already has momentum on weights that get pruned (optimizer built before pruning, then
    stepped), the weights stay exactly zero: weights are re-masked after every batch."""

    class WarmTask(ToyTask):
        @override
        def on_fit_start(self) -> None:  # runs after the callback pruned; dirty the moments of pruned weights
            optimizer = self.trainer.optimizers[0]
            for param in self.model.parameters():
                optimizer.state[param] = {
                    "step": torch.tensor(1.0),
                    "exp_avg": torch.ones_like(param),
                    "exp_avg_sq": torch.ones_like(param),
                }

    callback = ECoFLaPPruning(**FAST)
    task = WarmTask()
    trainer(tmp_path, [callback], max_steps=3, num_sanity_val_steps=0).fit(task, datamodule=ToyData())
    assert_pruned_weights_zero(task, callback.masks)


class SGDTask(ToyTask):
    """SGD with Nesterov momentum and (coupled) weight decay, stepped by a per-step scheduler."""

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TwoOptimizersTask(ToyTask):
    """Manual optimization: AdamW for the vision tower, SGD with momentum for the rest, clipped by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    @override
    def configure_optimizers(self) -> Any:
        vision = [param for name, param in self.model.named_parameters() if name.startswith("vision.")]
        rest = [param for name, param in self.model.named_parameters() if not name.startswith("vision.")]
        return [torch.optim.AdamW(vision, lr=1e-2, weight_decay=0.1), torch.optim.SGD(rest, lr=0.1, momentum=0.9)]

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizers = self.optimizers()
        loss = self.calibration_loss(batch)
        for optimizer in optimizers:  # type: ignore[union-attr]
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:  # type: ignore[union-attr]
            self.clip_gradients(optimizer, gradient_clip_val=0.1)
            optimizer.step()
        return loss


@pytest.mark.parametrize("task_class", [SGDTask, TwoOptimizersTask])
def test_masks_hold_under_other_optimizers(tmp_path: Path, task_class: type[ToyTask]) -> None:
    """Momentum, coupled weight decay, a scheduler, validation inside the epoch and several optimizers stepped by hand:
    every pruned weight is exactly 0 after fit, and the kept ones trained."""
    callback = ECoFLaPPruning(**FAST)
    task = task_class()
    dense = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    trainer(tmp_path, [callback], max_steps=-1, max_epochs=2, val_check_interval=2).fit(task, datamodule=ToyData())
    assert_pruned_weights_zero(task, callback.masks)
    params = dict(task.model.named_parameters())
    assert any(not torch.equal(params[n][m], dense[n][m]) for n, m in callback.masks.items())


class ManualClipTask(ToyTask):
    """Manual optimization with plain SGD, its gradients clipped by norm by hand before the step (Lightning's recipe);
    keeps the weights as pruned, at the start of training."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pruned_weights: dict[str, torch.Tensor] = {}

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @override
    def on_train_start(self) -> None:
        self.pruned_weights = {name: param.detach().clone() for name, param in self.model.named_parameters()}

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        loss = self.calibration_loss(batch)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=0.1, gradient_clip_algorithm="norm")  # type: ignore[arg-type]
        optimizer.step()  # type: ignore[union-attr]
        return loss


def test_manual_clipping_sees_the_gradients_of_the_pruned_model_only(tmp_path: Path) -> None:
    """The gradients were masked only inside `optimizer.step()`, after the task clipped them: the clip norm counted
    the pruned weights' gradients, so every kept weight took a smaller step than in the pruned model."""
    callback = ECoFLaPPruning(**FAST)
    task = ManualClipTask()
    trainer(tmp_path, [callback], max_steps=1, num_sanity_val_steps=0).fit(task, datamodule=ToyData())

    reference = ToyTask()  # one hand-written step of the pruned model: masked gradients, clipped, then SGD
    reference.model.load_state_dict(task.pruned_weights)
    reference.calibration_loss(next(iter(ToyData().train_dataloader()))).backward()
    params = dict(reference.model.named_parameters())
    with torch.no_grad():
        for name, mask in callback.masks.items():
            params[name].grad.mul_(mask.to(params[name].device))  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params.values(), 0.1)
        for param in params.values():
            param.sub_(0.1 * param.grad)  # type: ignore[operator]
    for name, param in task.model.named_parameters():
        torch.testing.assert_close(param.detach(), params[name].detach(), msg=name)


def test_checkpoint_state_round_trip(tmp_path: Path) -> None:
    callback = ECoFLaPPruning(**FAST)
    task = ToyTask()
    trainer(tmp_path, [callback], max_steps=1, num_sanity_val_steps=0).fit(task, datamodule=ToyData())

    torch.save(callback.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["pruned"] is True and state["version"] == 1
    assert all(mask.dtype == torch.bool and mask.device.type == "cpu" for mask in state["masks"].values())

    restored = ECoFLaPPruning(**FAST)
    restored.load_state_dict(state)
    assert restored.pruned and restored.report == callback.report
    assert restored.masks.keys() == callback.masks.keys()
    assert all(torch.equal(restored.masks[n], callback.masks[n].cpu()) for n in callback.masks)
    assert isinstance(restored.result, PruningResult)
    assert restored.result.overall_sparsity == pytest.approx(callback.result.overall_sparsity)  # type: ignore[union-attr]

    old = ECoFLaPPruning(**FAST)
    old.load_state_dict({"pruned": False})  # an older/other state without version, masks or report
    assert not old.pruned and old.masks == {} and old.report is None

    with pytest.raises(ValueError, match=r"state has version 2; this ecoflap-pl reads versions up to 1\. HINT:"):
        ECoFLaPPruning(**FAST).load_state_dict({**state, "version": 2})


def test_resume_restores_masks_and_does_not_prune_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ECoFLaPPruning(**FAST)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, [first, checkpoints], enable_checkpointing=True, max_steps=2, num_sanity_val_steps=0).fit(
        ToyTask(), datamodule=ToyData()
    )
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.exists()

    resumed = ECoFLaPPruning(**FAST)
    calls = count_prunes(resumed, monkeypatch)
    task = ToyTask(seed=123)  # other initial weights: they must come from the checkpoint
    trainer(tmp_path, [resumed], max_steps=5).fit(task, datamodule=ToyData(), ckpt_path=ckpt)

    assert calls == [] and resumed.pruned
    assert resumed.masks.keys() == first.masks.keys()
    assert all(torch.equal(resumed.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)
    assert_pruned_weights_zero(task, resumed.masks)
    assert task.sanity_zero_fraction is None or task.sanity_zero_fraction >= 0.45

    evaluator = ECoFLaPPruning(**FAST)
    calls = count_prunes(evaluator, monkeypatch)
    fresh = ToyTask(seed=7)
    trainer(tmp_path, [evaluator]).validate(fresh, datamodule=ToyData(), ckpt_path=ckpt)
    assert calls == [] and evaluator.pruned
    assert_pruned_weights_zero(fresh, evaluator.masks)


@pytest.mark.parametrize("entry", ["validate", "test"])
def test_a_weights_only_checkpoint_keeps_the_masks_and_is_not_pruned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    """Lightning writes no callback state into a weights-only checkpoint: the task adds the pruning state, so the
    checkpoint is evaluated with its own masks (it was pruned again on top, with other masks, before)."""
    first = ECoFLaPPruning(**{**FAST, "sparsity": 0.3})
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True, save_last=True)
    run = trainer(tmp_path, [first, checkpoints], enable_checkpointing=True, max_steps=3, num_sanity_val_steps=0)
    run.fit(ToyTask(), datamodule=ToyData())
    run.save_checkpoint(tmp_path / "saved.ckpt", weights_only=True)
    for ckpt in (tmp_path / "ckpt" / "last.ckpt", tmp_path / "saved.ckpt"):
        assert "optimizer_states" not in torch.load(ckpt, map_location="cpu", weights_only=False)  # weights only

        evaluator = ECoFLaPPruning(**{**FAST, "sparsity": 0.3})
        calls = count_prunes(evaluator, monkeypatch)
        fresh = ToyTask(seed=7)
        getattr(trainer(tmp_path, [evaluator], limit_test_batches=1), entry)(
            fresh, datamodule=ToyData(), ckpt_path=ckpt
        )
        assert calls == [] and evaluator.pruned
        assert evaluator.masks.keys() == first.masks.keys()
        assert all(torch.equal(evaluator.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)
        assert_pruned_weights_zero(fresh, evaluator.masks)
        assert zero_fraction(fresh.model) == pytest.approx(0.3, abs=1e-3)


def test_trainer_prune_restores_a_weights_only_checkpoint_and_fit_still_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`EcoflapTrainer.prune` runs `fit` with no step, whose restore raised Lightning's KeyError on a checkpoint
    without optimizer state. It restores the weights, the step and the masks and skips only the optimizers; for
    that call alone, also when it fails: `fit` of the same Trainer refuses the checkpoint afterwards, as before."""
    first = ECoFLaPPruning(**FAST)
    run = trainer(tmp_path, [first], max_steps=3, num_sanity_val_steps=0)
    run.fit(ToyTask(), datamodule=ToyData())
    weights_only = tmp_path / "weights_only.ckpt"
    run.save_checkpoint(weights_only, weights_only=True)
    state = torch.load(weights_only, map_location="cpu", weights_only=False)
    other = tmp_path / "other.ckpt"
    torch.save({**state, "state_dict": {}}, other)  # no weights: the restore of the model fails

    pruning = ECoFLaPPruning(**FAST)
    calls = count_prunes(pruning, monkeypatch)
    pruner = quiet_trainer(EcoflapTrainer, callbacks=[pruning], default_root_dir=tmp_path)
    assert isinstance(pruner, EcoflapTrainer)
    with pytest.raises(RuntimeError, match="Missing key"):
        pruner.prune(ToyTask(seed=7), datamodule=ToyData(), ckpt_path=str(other))
    task = ToyTask(seed=7)
    pruner.prune(task, datamodule=ToyData(), ckpt_path=str(weights_only))
    assert calls == [] and pruning.pruned and pruner.global_step == 3
    assert pruning.masks.keys() == first.masks.keys()
    assert all(torch.equal(pruning.masks[name], first.masks[name]) for name in first.masks)
    for name, weight in task.state_dict().items():
        assert torch.equal(weight, state["state_dict"][name]), name
    with pytest.raises(KeyError, match="Trying to restore optimizer state but checkpoint contains only the model"):
        pruner.fit(ToyTask(seed=7), datamodule=ToyData(), ckpt_path=weights_only)


def test_trainer_prune_gives_the_trainer_s_settings_back_so_fit_then_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`EcoflapTrainer.prune` set `max_steps` and the sanity check to 0 and dropped the model summary for good: a
    `fit` of the same Trainer afterwards trained nothing, without a word."""
    pruning = ECoFLaPPruning(**FAST)
    calls = count_prunes(pruning, monkeypatch)
    settings = {"max_steps": 3, "num_sanity_val_steps": 1, "enable_model_summary": True}
    run = quiet_trainer(EcoflapTrainer, callbacks=[pruning], default_root_dir=tmp_path, **settings)
    assert isinstance(run, EcoflapTrainer)
    callbacks = list(run.callbacks)
    assert any(isinstance(callback, ModelSummary) for callback in callbacks)
    task = ToyTask()
    run.prune(task, datamodule=ToyData())
    assert len(calls) == 1 and run.global_step == 0
    assert run.max_steps == 3 and run.num_sanity_val_steps == 1 and run.callbacks == callbacks
    assert run.max_epochs is None  # unset, as before: `fit` sets 1000 for max_steps -1, -1 (no limit) for 0
    run.fit(task, datamodule=ToyData())
    assert run.global_step == 3 and len(calls) == 1  # trained as configured, on the masks pruning made
    assert_pruned_weights_zero(task, pruning.masks)


@pytest.mark.parametrize("averaging_first", [True, False])
@pytest.mark.parametrize("first_update", [0, 100])
def test_ema_weight_averaging_keeps_the_masks(tmp_path: Path, averaging_first: bool, first_update: int) -> None:
    """Lightning's EMA copies the model in `setup`, dense, before pruning: until its first update (never, within
    `update_starting_at_step` 100) its checkpoints stored that copy as the weights and the end of training copied it
    into the model, with every pruned weight back."""
    callback = ECoFLaPPruning(**FAST)
    averaging = EMAWeightAveraging(decay=0.9, update_starting_at_step=first_update)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    callbacks = [averaging, callback] if averaging_first else [callback, averaging]
    task = ToyTask()
    trainer(tmp_path, [*callbacks, checkpoints], enable_checkpointing=True, max_steps=3).fit(task, datamodule=ToyData())

    assert_pruned_weights_zero(task, callback.masks)
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 3
    for ckpt in saved:
        weights = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        for name, mask in callback.masks.items():
            assert torch.count_nonzero(weights[f"model.{name}"][~mask.cpu()]) == 0, (ckpt.name, name)


def test_stochastic_weight_averaging_stores_a_masked_average(tmp_path: Path) -> None:
    """SWA copies the model in `setup`, dense, and stores that copy in every checkpoint until it starts averaging."""
    callback = ECoFLaPPruning(**FAST)
    averaging = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=5)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run = trainer(tmp_path, [averaging, callback, checkpoints], enable_checkpointing=True, max_steps=4)
    run.fit(ToyTask(), datamodule=ToyData())
    for ckpt in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
        average = next(value for key, value in state.items() if "StochasticWeightAveraging" in key)
        for name, mask in callback.masks.items():
            stored = average["average_model_state"][f"model.{name}"]
            assert torch.count_nonzero(stored[~mask.cpu()]) == 0, (ckpt.name, name)


def test_resume_with_other_settings_warns_and_keeps_masks(tmp_path: Path) -> None:
    callback = ECoFLaPPruning(**FAST)
    trainer(tmp_path, [callback], max_steps=1, num_sanity_val_steps=0).fit(ToyTask(), datamodule=ToyData())
    other = ECoFLaPPruning(**{**FAST, "sparsity": 0.3})
    with pytest.warns(UserWarning, match="max_sparsity, sparsity"):
        other.load_state_dict(callback.state_dict())
    assert other.pruned


@pytest.mark.parametrize(
    ("stages", "entry", "prunes"),
    [
        (("validate",), "validate", True),
        (("test",), "test", True),
        (("predict",), "predict", True),
        (("test",), "fit", False),
        (("fit",), "validate", False),
    ],
)
def test_only_the_chosen_stages_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: tuple[str, ...], entry: str, prunes: bool
) -> None:
    callback = ECoFLaPPruning(**FAST, stages=stages)
    calls = count_prunes(callback, monkeypatch)
    task = ToyTask()
    run = trainer(tmp_path, [callback], max_steps=1, limit_test_batches=1, limit_predict_batches=1)
    getattr(run, entry)(task, datamodule=ToyData())
    assert calls == ([entry] if prunes else [])
    assert (zero_fraction(task.model) >= 0.45) is prunes


def test_later_stages_reuse_the_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callback = ECoFLaPPruning(**FAST)
    calls = count_prunes(callback, monkeypatch)
    task, data = ToyTask(), ToyData()
    run = trainer(tmp_path, [callback], max_steps=2, limit_test_batches=1)
    run.fit(task, datamodule=data)
    run.test(task, datamodule=data)
    assert calls == ["fit"]


# ------------------------------------------------------------------ errors


def test_signature_mirrors_pruning_config() -> None:
    parameters = inspect.signature(ECoFLaPPruning.__init__).parameters
    for field in PruningConfig.__dataclass_fields__:
        assert field in parameters, field
        assert PruningConfig(**{field: parameters[field].default}) == PruningConfig(), f"default of {field}"
    assert ECoFLaPPruning().config == PruningConfig()
    assert {"stages", "save_to", "report_dir", "progress"} <= set(parameters)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.2}, r"`sparsity` must be in \[0, 1\)"),
        ({"importance": "second_order"}, r"`importance` must be one of"),
        ({"stages": ["train"]}, r"`stages` must be a subset of \['fit', 'validate', 'test', 'predict'\]"),
        ({"save_to": 3}, r"`save_to` must be a directory path or None, got 3\..*HINT"),
        ({"report_dir": ""}, r"`report_dir` must be a directory path or None"),
        ({"progress": "yes"}, r"`progress` must be True or False"),
    ],
)
def test_constructor_errors(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        ECoFLaPPruning(**kwargs)


def test_stage_given_as_a_string_is_accepted() -> None:
    assert ECoFLaPPruning(stages="test").stages == ("test",)


def test_missing_calibration_dataloader_is_explained(tmp_path: Path) -> None:
    class PlainData(pl.LightningDataModule):
        @override
        def val_dataloader(self) -> DataLoader:
            return ToyData().val_dataloader()

    with pytest.raises(AttributeError, match=r"PlainData has none\. HINT: .*def calibration_dataloader"):
        trainer(tmp_path, [ECoFLaPPruning(**FAST)]).validate(ToyTask(), datamodule=PlainData())
    with pytest.raises(AttributeError, match="no DataModule was given"):
        trainer(tmp_path, [ECoFLaPPruning(**FAST)]).validate(ToyTask(), ToyData().val_dataloader())


def test_task_without_model_is_explained(tmp_path: Path) -> None:
    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

        @override
        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(TypeError, match=r"Bare has no `model` \(an nn.Module\)\. HINT: subclass"):
        trainer(tmp_path, [ECoFLaPPruning(**FAST)]).validate(Bare(), datamodule=ToyData())


def test_too_few_calibration_batches_for_the_ranks_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    callback = ECoFLaPPruning(**{**FAST, "coarse_samples": 4, "fine_samples": 4}, stages="validate")
    run = trainer(tmp_path, [callback])
    # Pretend to be rank 0 of two: prune() refuses on every rank alike, before any collective call.
    monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="Each of the 2 ranks needs at least one calibration batch"):
        run.validate(ToyTask(), datamodule=ToyData())
    assert not callback.pruned


@pytest.mark.parametrize(
    ("settings", "samples", "error"),
    [
        ({"coarse_samples": 4, "fine_samples": 4}, 16, "Each of the 2 ranks needs at least one calibration batch"),
        ({"allocation": "auto", "coarse_samples": 8, "fine_samples": 8}, 8, "held-out calibration batches after the 2"),
        ({}, 0, "yielded no batch"),
    ],
)
def test_calibration_data_is_checked_without_loading_a_sample(
    settings: dict[str, Any], samples: int, error: str
) -> None:
    """What pruning would refuse on every rank, refused from the batch sizes alone (the ``ecoflap`` command runs this
    before a DDP launcher starts its processes, so that the refusal is printed once)."""
    callback = ECoFLaPPruning(**{**FAST, **settings})
    with pytest.raises(ValueError, match=error):
        callback.check_calibration_data(ToyData(samples), world_size=2)
    callback.check_calibration_data(ToyData(24), world_size=1)  # one rank, and auto has its held-out batches


def test_progress_bars_and_summary_table_on_rank_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = ECoFLaPPruning(**{**FAST, "progress": True}, stages="validate", report_dir=str(tmp_path / "report"))
    trainer(tmp_path, [callback]).validate(ToyTask(), datamodule=ToyData())
    out = capsys.readouterr().out
    for expected in ("ECoFLaP coarse", "ECoFLaP fine", "vision (tower)", "text (tower)", "Pruning cost per stage"):
        assert expected in out
    assert (tmp_path / "report" / "pruning_report.json").exists()


def test_builds_from_a_yaml_section_through_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ECoFLaPPruning, "pruning")
    config = parser.parse_string(
        "pruning:\n  sparsity: 0.6\n  method: sparsegpt\n  exclude: ['*head*']\n  stages: [validate]\n  save_to: out\n"
    )
    callback = parser.instantiate(config).pruning
    assert callback.config == PruningConfig(sparsity=0.6, method="sparsegpt", exclude=("*head*",))
    assert callback.stages == ("validate",) and callback.save_to == "out"


def test_empty_stages_never_prune():
    assert ECoFLaPPruning(stages=[]).stages == ()


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_first_order_scoring_runs_inside_evaluation_stages(tmp_path: Path, entry: str) -> None:
    # Lightning runs evaluation hooks in inference mode, where back-propagation is impossible.
    callback = ECoFLaPPruning(**{**FAST, "importance": "first_order"}, stages=[entry])
    task = ToyTask()
    run = trainer(tmp_path, [callback], limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1)
    getattr(run, entry)(task, datamodule=ToyData())
    assert callback.result is not None and all(score > 0 for score in callback.result.group_scores.values())
    assert zero_fraction(task.model) >= 0.45


def test_empty_calibration_data_names_the_split_not_the_sample_counts(tmp_path: Path) -> None:
    class EmptyCalibration(ToyData):
        @override
        def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader:
            return DataLoader([], batch_size=4)

    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    with pytest.raises(ValueError, match=r"EmptyCalibration yielded no batch: the split it samples .* is empty"):
        trainer(tmp_path, [ECoFLaPPruning(**FAST)]).validate(task, datamodule=EmptyCalibration())
    assert all(torch.equal(tensor, before[name]) for name, tensor in task.state_dict().items())


def test_auto_allocation_reads_its_heldout_samples_and_reports_the_candidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = {**FAST, "fine_samples": 8, "allocation": "auto", "auto_holdout_samples": 8, "progress": True}
    callback = ECoFLaPPruning(**settings, stages="validate", report_dir=str(tmp_path / "report"))
    assert callback.config.calibration_samples == 16
    trainer(tmp_path, [callback]).validate(ToyTask(), datamodule=ToyData(samples=16))
    out = capsys.readouterr().out
    assert "auto: candidate allocations" in out and "a plain run" in out
    report = json.loads((tmp_path / "report" / "pruning_report.json").read_text())
    assert report["candidates"][0]["name"] == "uniform" and report["chosen_candidate"] in out
    losses = {c["name"]: c["heldout_loss"] for c in report["candidates"]}
    assert report["chosen_candidate"] == min(losses, key=losses.__getitem__)
    assert report["search_cost_ratio"] > 1
