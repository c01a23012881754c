"""``ECoFLaPPruning``: prune a task's model once before fit/validate/test/predict, then keep its masks fixed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from torch import nn

import ecoflap_pl
from ecoflap_pl.callbacks.export import save_pruned_model
from ecoflap_pl.callbacks.masks import mask_gradients_, mask_weights_
from ecoflap_pl.callbacks.progress import StageProgress
from ecoflap_pl.pruning import PruningConfig, PruningResult, prune
from ecoflap_pl.pruning.config import DEFAULT_EXCLUDE, AllocationName, ImportanceName, MethodName, ScoreName
from ecoflap_pl.reporting import REPORT_JSON, render_table, report_dict, write_report

logger = logging.getLogger(__name__)

STAGES = ("fit", "validate", "test", "predict")
_STATE_VERSION = 1


def _check_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [stage for stage in chosen if stage not in STAGES]
    if unknown:
        raise ValueError(
            f"`stages` must be a subset of {list(STAGES)}, got {stages!r}. "
            "HINT: ['fit'] prunes before fine-tuning; ['validate'] or ['test'] prunes then evaluates; [] never prunes."
        )
    return tuple(dict.fromkeys(chosen))


def _check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"`{name}` must be a directory path or None, got {value!r}. HINT: e.g. '{name}: out/pruned'.")
    return str(value)


class ECoFLaPPruning(Callback):
    """Prune ``pl_module.model`` with ECoFLaP once, before the first stage in ``stages``, and keep it pruned.

    The coarse pass (global importance -> per-block sparsity) and the fine pass (layer-wise masks) run on the
    target device with calibration batches from ``trainer.datamodule.calibration_dataloader(n)``; the loss is the
    task's ``calibration_loss(batch)``. Under DDP each rank scores its share of the batches and the statistics are
    summed through the strategy, so every rank builds identical masks. During fine-tuning the gradients of pruned
    weights are zeroed before every optimizer step and the pruned weights are re-zeroed after every training batch.
    The masks, the report and the ``pruned`` flag travel in every checkpoint, so resuming or evaluating a pruned
    checkpoint never prunes again.

    The pruning arguments are the fields of :class:`~ecoflap_pl.pruning.PruningConfig`, validated when the callback
    is built.

    Args:
        sparsity: target fraction of zeros over all candidate weights, in [0, 1).
        max_sparsity: cap on any group's sparsity; default ``sparsity + 0.1``.
        importance: ``"zeroth_order"`` (forward-only), ``"first_order"`` (backprop) or ``"uniform"`` (no scores;
            with the default allocation, the uniform baseline).
        allocation: per-group sparsity strategy: ``"ecoflap"`` (the paper's rule), ``"uniform"``, ``"owl"``,
            ``"from_report"`` or ``"auto"`` (the candidate with the lowest held-out calibration loss).
        owl_m: OWL's outlier multiple ``M`` (Wanda scores above ``M`` × the block mean are outliers).
        owl_lambda: OWL's band: group sparsities stay in ``[sparsity − λ, sparsity + λ]``.
        allocation_report: ``pruning_report.json`` of an earlier run, for ``allocation: from_report``.
        auto_holdout_samples: held-out calibration samples that score ``auto``'s candidates.
        score: ``"grad_only"``, ``"grad_mag_abs"`` or ``"grad_mag_square"``.
        aggregate: group score as the ``"sum"`` or the ``"avg"`` of its elements' scores.
        granularity: one sparsity per ``"block"``, per weight tensor (``"layer"``) or per tower (``"model"``).
        method: local pruner: ``"wanda"``, ``"sparsegpt"``, ``"magnitude"`` or a method registered with
            ``ecoflap_pl.pruning.methods.register_method``.
        structure: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
        comparison: ``"per_row"`` or ``"per_matrix"`` ranking; default depends on ``method``.
        coarse_samples: calibration samples of the coarse pass.
        fine_samples: calibration samples of the fine pass.
        eps: zeroth-order perturbation size.
        probes: zeroth-order random directions per batch.
        probe_granularity: ``"per_tensor"`` or ``"per_block"`` zeroth-order probes.
        prune_per_model: meet the sparsity budget inside each tower separately.
        include: glob patterns of parameter names to consider.
        exclude: glob patterns of parameter names never pruned (default: the BLIP-2 Q-Former).
        sparsegpt_block_size: SparseGPT column block size.
        sparsegpt_damping: SparseGPT damping (fraction of the mean Hessian diagonal).
        seed: seed of every random choice.
        stages: the trainer entry points that prune (when not pruned yet): any of ``"fit"``, ``"validate"``,
            ``"test"``, ``"predict"``; ``[]`` never prunes (dense training or evaluation; a pruned checkpoint still
            keeps its masks).
        save_to: directory receiving the pruned model (``save_pretrained`` for Hugging Face models, else
            ``model.safetensors``), the task's tokenizer/processor and the report; written after pruning and again
            at the end of ``fit`` (the fine-tuned weights).
        report_dir: directory of ``pruning_report.json`` and ``pruning_sparsity.png``; default ``trainer.log_dir``.
        progress: show rich progress bars and the summary table on rank 0.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        max_sparsity: float | None = None,
        importance: ImportanceName | str = "zeroth_order",
        allocation: AllocationName = "ecoflap",
        owl_m: float = 5.0,
        owl_lambda: float = 0.08,
        allocation_report: str | None = None,
        auto_holdout_samples: int = 16,
        score: ScoreName | str = "grad_only",
        aggregate: str = "sum",
        granularity: str = "block",
        method: MethodName | str = "wanda",
        structure: str = "unstructured",
        comparison: str | None = None,
        coarse_samples: int = 32,
        fine_samples: int = 128,
        eps: float = 1e-3,
        probes: int = 1,
        probe_granularity: str = "per_tensor",
        prune_per_model: bool = False,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        sparsegpt_block_size: int = 128,
        sparsegpt_damping: float = 0.01,
        seed: int = 0,
        stages: Sequence[str] = ("fit", "validate", "test"),
        save_to: str | None = None,
        report_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        self.config = PruningConfig(
            sparsity=sparsity,
            max_sparsity=max_sparsity,
            importance=importance,
            allocation=allocation,
            owl_m=owl_m,
            owl_lambda=owl_lambda,
            allocation_report=allocation_report,
            auto_holdout_samples=auto_holdout_samples,
            score=score,
            aggregate=aggregate,
            granularity=granularity,
            method=method,
            structure=structure,
            comparison=comparison,
            coarse_samples=coarse_samples,
            fine_samples=fine_samples,
            eps=eps,
            probes=probes,
            probe_granularity=probe_granularity,
            prune_per_model=prune_per_model,
            include=tuple(include),
            exclude=tuple(exclude),
            sparsegpt_block_size=sparsegpt_block_size,
            sparsegpt_damping=sparsegpt_damping,
            seed=seed,
        )
        self.stages = _check_stages(stages)
        self.save_to = _check_path("save_to", save_to)
        self.report_dir = _check_path("report_dir", report_dir)
        if not isinstance(progress, bool):
            raise ValueError(f"`progress` must be True or False, got {progress!r}.")
        self.progress = progress
        self.pruned = False
        self.masks: dict[str, torch.Tensor] = {}
        self.report: dict[str, Any] | None = None
        self.masks_from: str | None = None
        self._result: PruningResult | None = None

    @property
    def result(self) -> PruningResult | None:
        """The pruning result (rebuilt from the report after loading a checkpoint); ``None`` before pruning."""
        if self._result is None and self.report is not None:
            self._result = PruningResult.from_dict(self.report, self.masks)
        return self._result

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Fail fast, before any data or device work. Pruning itself waits for the stage's start hook: here the
        # model may still be on the CPU, and a checkpoint's callback state (the "already pruned" flag) is only
        # restored after `setup`.
        _pruned_module(pl_module)
        if stage in self.stages and trainer.strategy.restore_checkpoint_after_setup:
            raise ValueError(
                f"ECoFLaPPruning cannot prune under {type(trainer.strategy).__name__}: it shards the parameters and "
                "restores checkpoints only after the model is wrapped. HINT: prune with a DDP or single-device "
                "Trainer (stages ['validate'] and save_to), then fine-tune the saved pruned model."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `on_fit_start` runs after the checkpoint's callback state is restored, after the strategy moved the model
        # to its device (and wrapped it in DDP), and before the sanity check and the first optimizer step. Pruning
        # changes weights in place (same Parameter objects), so the optimizers built by `strategy.setup` stay
        # valid, and their (empty or restored) state is consistent with the masked gradients.
        self._ensure_pruned(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Within `fit` (including the sanity check) this hook must not prune: `on_fit_start` owns that stage.
        if trainer.state.fn == "validate":
            self._ensure_pruned(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_pruned(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_pruned(trainer, pl_module, "predict")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Runs after the (accumulated, DDP-reduced, unscaled) gradients are final and before clipping and the
        # step: zeroed gradients keep Adam's moments of pruned weights at zero and leave them out of the clip norm.
        if self.masks:
            mask_gradients_(_pruned_module(pl_module), self.masks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Zero gradients alone are not a guarantee (decoupled weight decay on a restored momentum, optimizers that
        # step without gradients, other callbacks touching weights), so the weights themselves are re-masked after
        # every training batch: before any validation, logging or checkpoint can see them.
        if self.masks:
            mask_weights_(_pruned_module(pl_module), self.masks)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned and self.save_to is not None and trainer.is_global_zero:
            self._save(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and self.save_to is not None and trainer.is_global_zero:
            rank_zero_warn(self._interrupted_save_notice(trainer.global_step))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "pruned": self.pruned,
            "masks": {name: mask.detach().to("cpu", torch.bool) for name, mask in self.masks.items()},
            "report": self.report,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = bool(state_dict.get("pruned", False))
        self.masks = {name: torch.as_tensor(mask).bool() for name, mask in state_dict.get("masks", {}).items()}
        self.report = state_dict.get("report")
        self.masks_from = "the checkpoint" if self.pruned else None  # the path is known once the stage starts
        self._result = None
        if self.pruned and self.report is not None:
            saved, current = self.report.get("config", {}), self.config.to_dict()
            changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
            if changed:
                rank_zero_warn(
                    f"The checkpoint was pruned with other settings ({', '.join(changed)}); its masks are kept and "
                    "the model is not pruned again. HINT: start from the dense model to prune with new settings."
                )

    def checkpoint_is_pruned(self, ckpt_path: str | Path) -> bool:
        """Whether the Lightning checkpoint at ``ckpt_path`` holds this callback's state with a pruned model.

        Read before a run (memory-mapped: the weights are not loaded) by the CLI to plan ``compare_dense``; during
        the run, the state Lightning restores decides as always.

        Raises:
            ValueError: the file is not a readable checkpoint.
        """
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:  # torch raises several types for files that are not checkpoints
            raise ValueError(
                f"`ckpt_path` {str(ckpt_path)!r} cannot be read as a Lightning checkpoint: {error}. HINT: pass a "
                "complete `.ckpt` file written by the Trainer (a copy interrupted mid-write is truncated)."
            ) from error
        state = checkpoint.get("callbacks", {}).get(self.state_key, {}) if isinstance(checkpoint, dict) else {}
        return bool(state.get("pruned", False))

    # ---------------------------------------------------------------- workers

    def _ensure_pruned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruned:
            # Restored from a checkpoint or pruned by an earlier stage: put the masks on the weights' device and
            # make sure the weights honour them.
            mask_weights_(_pruned_module(pl_module), self.masks)
            if self.masks_from == "the checkpoint":
                self.masks_from = f"the checkpoint {trainer.ckpt_path}"
                sparsity = self.result.overall_sparsity if self.result is not None else float("nan")
                rank_zero_info(
                    f"The model is already pruned ({100 * sparsity:.1f}% of the candidate weights; masks from "
                    f"{self.masks_from}): `{stage}` uses it as it is, it is not pruned again."
                )
        elif stage in self.stages:
            # validate/test/predict hooks run inside Lightning's inference mode: lift it, so that calibration
            # batches are ordinary tensors and first-order scoring can back-propagate.
            with torch.inference_mode(False), torch.enable_grad():
                self._prune(trainer, pl_module, stage)
            self.masks_from = f"pruning at the start of {stage}"
        else:
            rank_zero_warn(
                f"`pruning.stages` is {list(self.stages)}, so `{stage}` runs on the dense model (nothing is pruned). "
                f"HINT: add '{stage}' to pruning.stages to prune before {stage}."
            )

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> PruningResult:
        model = _pruned_module(pl_module)
        batches = self._calibration_batches(trainer, pl_module)
        world_size, rank = trainer.world_size, trainer.global_rank

        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(tensor, reduce_op="sum")

        forward_context = _calibration_context(trainer)

        def loss_fn(_: nn.Module, batch: Any) -> torch.Tensor:
            with forward_context():
                return pl_module.calibration_loss(batch)  # type: ignore[operator]

        report_dir = self.report_dir or trainer.log_dir or trainer.default_root_dir  # log_dir is collective
        with StageProgress(self.progress and trainer.is_global_zero) as progress:
            result = prune(
                model,
                batches,
                loss_fn,
                self.config,
                all_reduce=all_reduce if world_size > 1 else None,
                rank=rank,
                world_size=world_size,
                progress=_stopping_on_sigterm(trainer, progress),
            )
        self._result = result
        self.masks = dict(result.masks)
        self.pruned = True
        metadata = {
            "ecoflap_pl_version": ecoflap_pl.__version__,
            "task": type(pl_module).__qualname__,
            "model": type(model).__qualname__,
            "stage": stage,
            "world_size": world_size,
            "global_step": trainer.global_step,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.report = report_dict(result, metadata)
        self._log_to_loggers(trainer, result)
        if trainer.is_global_zero:
            if self.progress:
                Console().print(render_table(result))
            write_report(result, report_dir, metadata)
            if self.save_to is not None:
                self._save(pl_module)
        return result

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        datamodule = trainer.datamodule
        factory = getattr(datamodule, "calibration_dataloader", None)
        if not callable(factory):
            where = "no DataModule was given" if datamodule is None else f"{type(datamodule).__name__} has none"
            raise AttributeError(
                "ECoFLaPPruning needs calibration data from `trainer.datamodule.calibration_dataloader(num_samples)`, "
                f"but {where}. HINT: use a DataModule from ecoflap_pl.datamodules, or add "
                "`def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader` to your "
                "LightningDataModule and pass it as `datamodule=`."
            )
        loader = factory(self.config.calibration_samples)
        batches = list(loader)
        if not batches:
            raise ValueError(
                f"The calibration dataloader of {type(datamodule).__name__} yielded no batch: the split it samples "
                "(the training split for ecoflap_pl DataModules) is empty. HINT: check the training annotations under "
                "`data_dir`; pruning needs at least one calibration sample."
            )
        world_size, rank = trainer.world_size, trainer.global_rank
        # prune() refuses, identically on every rank, a set too short to give each rank a batch of every step.
        for batch_id in range(rank, len(batches), world_size):
            # Only this rank's share is evaluated here (the others are only counted), so only it moves to the device.
            batch = pl_module.transfer_batch_to_device(batches[batch_id], pl_module.device, 0)
            batches[batch_id] = trainer.precision_plugin.convert_input(batch)
        return batches

    def _log_to_loggers(self, trainer: pl.Trainer, result: PruningResult) -> None:
        metrics = {"pruning/overall_sparsity": result.overall_sparsity}
        metrics.update(
            {f"pruning/sparsity/{tower or 'root'}": value for tower, value in result.tower_sparsity().items()}
        )
        metrics.update({f"pruning/seconds/{stage}": stats.seconds for stage, stats in result.stages.items()})
        metrics["pruning/seconds"] = sum(stats.seconds for stats in result.stages.values())
        for experiment_logger in trainer.loggers:
            experiment_logger.log_hyperparams({"pruning": self.config.to_dict()})
            experiment_logger.log_metrics(metrics, step=trainer.global_step)

    def _interrupted_save_notice(self, global_step: int) -> str:
        """What ``save_to`` holds after ``fit`` stopped early (an interrupt or an error)."""
        if not self.pruned:
            return f"`fit` stopped before pruning finished: weights unchanged, nothing saved to {self.save_to}."
        saved = _read_report_metadata(Path(self.save_to) / REPORT_JSON)
        ours = self.report is not None and saved is not None and saved == self.report.get("metadata")
        if not ours:
            return f"`fit` stopped at step {global_step}: nothing from this run was saved to {self.save_to}."
        return (
            f"`fit` stopped at step {global_step}: {self.save_to} holds the model as pruned BEFORE fine-tuning, not "
            "the fine-tuned one. HINT: resume from the last checkpoint with `--ckpt_path`; save_to is written again "
            "when fit ends."
        )

    def _save(self, pl_module: pl.LightningModule) -> None:
        assert self.save_to is not None and self.result is not None
        processors = [getattr(pl_module, name, None) for name in ("processor", "tokenizer")]
        save_pruned_model(_pruned_module(pl_module), self.save_to, *processors)
        write_report(self.result, self.save_to, (self.report or {}).get("metadata"))


def _read_report_metadata(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("metadata")
    except (OSError, ValueError, AttributeError):
        return None


def _stopping_on_sigterm(
    trainer: pl.Trainer, progress: Callable[[str, int, int], None]
) -> Callable[[str, int, int], None]:
    """``progress`` that first stops pruning when the Trainer received SIGTERM.

    Lightning's SIGTERM handler only sets ``trainer.received_sigterm``; its loops check the flag between batches,
    but pruning runs inside one hook. Raising here, between two units of work, rolls the weights back (the engine
    is transactional) and ends the run the way Lightning ends it on SIGTERM.
    """

    def report(stage: str, done: int, total: int) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(143)
        progress(stage, done, total)

    return report


def _pruned_module(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module) or not callable(getattr(pl_module, "calibration_loss", None)):
        missing = "`model` (an nn.Module)" if not isinstance(model, nn.Module) else "`calibration_loss(batch)`"
        raise TypeError(
            f"ECoFLaPPruning prunes `pl_module.model` with `pl_module.calibration_loss(batch)`, but "
            f"{type(pl_module).__name__} has no {missing}. HINT: subclass ecoflap_pl.tasks.base.EcoflapTask, "
            "assign the network to `self.model` and define `calibration_loss`."
        )
    return model


def _calibration_context(trainer: pl.Trainer) -> Callable[[], AbstractContextManager[Any]]:
    """The forward context of the calibration loss.

    True-precision plugins (``bf16-true``, ``16-true``) hold the model in that dtype, so the forward runs in their
    context as in training. Mixed precision is left out on purpose: autocast to 16 bits would drown the ±ε
    differences of the zeroth-order probes, and the engine's statistics are fp32 anyway.
    """
    plugin = trainer.precision_plugin
    return nullcontext if isinstance(plugin, MixedPrecision) else plugin.forward_context
