"""``ECoFLaPPruning``: prune a task's model once before fit/validate/test/predict, then keep its masks fixed."""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from torch import nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

import ecoflap_pl
from ecoflap_pl.callbacks.checkpoint_file import check_checkpoint_room, use_whole_file_checkpoints
from ecoflap_pl.callbacks.export import (
    check_saved_masks,
    describe_saved,
    save_pruned,
    saved_model_folder,
    source_directories,
)
from ecoflap_pl.callbacks.masks import mask_gradients_, mask_weights_
from ecoflap_pl.callbacks.progress import StageProgress
from ecoflap_pl.datamodules.resumable import drop_loader_built_before_restore
from ecoflap_pl.entry_point import SIGTERM_STATUS
from ecoflap_pl.export import (
    check_masks_fit_save_format,
    check_save_format,
    check_save_target,
    check_writable_folder,
    least_export_bytes,
    read_masks,
)
from ecoflap_pl.export.semi_structured import check_semi_structured, to_semi_structured_
from ecoflap_pl.models.placement import OffloadedWeights, StoredTensors, placement
from ecoflap_pl.process_group import destroy_gloo_group_at_exit
from ecoflap_pl.pruning import PruningConfig, PruningResult, check_before_pruning, check_calibration_sizes, prune
from ecoflap_pl.pruning.config import DEFAULT_EXCLUDE, AllocationName, ImportanceName, MethodName, ScoreName
from ecoflap_pl.pruning.masks import masks_sparsity
from ecoflap_pl.reporting import REPORT_JSON, render_table, report_dict, write_report

logger = logging.getLogger(__name__)

STAGES = tuple(fn.value for fn in TrainerFn)
_STATE_VERSION = 1
"""Version of :meth:`ECoFLaPPruning.state_dict`; checkpoints without one are version 1."""


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
    # Expanded once, here: every reader of the folder (the report of an earlier export in it, too) sees one path.
    return str(Path(value).expanduser())


class ECoFLaPPruning(Callback):
    """Prune ``pl_module.model`` with ECoFLaP once, before the first stage in ``stages``, and keep it pruned.

    The coarse pass (global importance -> per-block sparsity) and the fine pass (layer-wise masks) run on the
    target device with calibration batches from ``trainer.datamodule.calibration_dataloader(n)``; the loss is the
    task's ``calibration_loss(batch)``. Under DDP each rank scores its share of the batches and the statistics are
    summed through the strategy, so every rank builds identical masks. During fine-tuning the gradients of pruned
    weights are zeroed after every backward and before every optimizer step, and the pruned weights are re-zeroed
    after every training batch. The masks, the report and the ``pruned`` flag travel in every checkpoint, so resuming
    or evaluating a pruned checkpoint never prunes again. Likewise a model loaded from a folder that ``save_to`` wrote
    (``pretrained: DIR``) is already pruned: its saved masks are read back and held fixed, and it is not pruned again
    (see ``reuse_saved_masks``).

    The pruning arguments are the fields of :class:`~ecoflap_pl.pruning.PruningConfig`, validated when the callback
    is built.

    Args:
        sparsity: target fraction of zeros over all candidate weights, in [0, 1).
        max_sparsity: cap on any group's sparsity; default ``sparsity + 0.1``.
        importance: ``"zeroth_order"`` (forward-only), ``"first_order"`` (backprop), ``"gradient_norm"`` (backprop:
            the exact expectation of zeroth order's estimates) or ``"uniform"`` (no scores; with the default
            allocation, the uniform baseline).
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
        probe_granularity: ``"per_tensor"`` or ``"per_block"`` zeroth-order probes (and the units whose gradient
            norms ``gradient_norm`` takes).
        prune_per_model: meet the sparsity budget inside each tower separately.
        include: glob patterns of parameter names to consider.
        exclude: glob patterns of parameter names never pruned (default: the BLIP-2 Q-Former).
        sparsegpt_block_size: SparseGPT column block size.
        sparsegpt_damping: SparseGPT damping (fraction of the mean Hessian diagonal).
        seed: seed of every random choice.
        activation_storage: zeroth order: where the block outputs recorded for prefix reuse live: ``"auto"``,
            ``"device"``, ``"cpu"``, or ``"recompute"`` (no record: one full forward per probe, the reference loop).
            ``"cpu"`` also keeps the fine pass's calibration activations in CPU memory between blocks.
        max_probe_replicas: zeroth order: most probes per forward, on copies of the calibration batch.
        fine_replay_batches: fine step: most calibration batches stacked into one block replay.
        stages: the trainer entry points that prune (when not pruned yet): any of ``"fit"``, ``"validate"``,
            ``"test"``, ``"predict"``; ``[]`` never prunes (dense training or evaluation; a pruned checkpoint still
            keeps its masks).
        save_to: directory receiving the pruned model (in ``save_format``), its masks, the task's
            tokenizer/processor and the report; written after pruning and again at the end of ``fit`` when training
            changed the weights. The files are written beside it and moved into place once complete, so the folder
            always holds either its old content or the complete new one. Checked before pruning: it must not hold
            the ``pretrained`` source weights, and must be new or empty unless ``overwrite``.
        save_format: ``"dense"`` (``save_pretrained``, zeros in place; ``model.safetensors`` for timm/plain
            modules), ``"sparse-bitmask"`` (the pruned weights as kept values plus a bitmask: any sparsity pattern)
            or ``"sparse-24-bitmask"`` (2:4 masks only), the ``compressed-tensors`` sparse layouts; load any of them
            with :func:`ecoflap_pl.export.load_pruned_model`.
        overwrite: let ``save_to`` replace a non-empty folder (swapped out only once the new one is complete).
        reuse_saved_masks: a model loaded from a ``save_to`` folder (its masks beside its weights, or in its sparse
            format) keeps those masks: every stage uses it as it is, and fine-tuning holds them fixed. ``False``
            treats it as any model: pruned again in ``stages`` (e.g. to a higher sparsity), else run dense.
        semi_structured: for ``validate``/``test``/``predict`` of a 2:4-pruned model on a CUDA GPU, swap the pruned
            Linear weights for PyTorch semi-structured sparse tensors, so that they run on sparse tensor cores
            (16-bit weights: use ``precision: bf16-true``). Evaluation and inference only.
        report_dir: directory of ``pruning_report.json`` and ``pruning_sparsity.png``; default ``trainer.log_dir``.
        progress: show rich progress bars and the summary table on rank 0.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        max_sparsity: float | None = None,
        importance: ImportanceName | str = "zeroth_order",
        allocation: AllocationName | str = "ecoflap",
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
        include: Sequence[str] | str = ("*",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        sparsegpt_block_size: int = 128,
        sparsegpt_damping: float = 0.01,
        seed: int = 0,
        activation_storage: str = "auto",
        max_probe_replicas: int = 8,
        fine_replay_batches: int = 8,
        stages: Sequence[str] | str = ("fit", "validate", "test"),
        save_to: str | None = None,
        save_format: str = "dense",
        overwrite: bool = False,
        reuse_saved_masks: bool = True,
        report_dir: str | None = None,
        progress: bool = True,
        semi_structured: bool = False,
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
            # PruningConfig makes a tuple of any sequence, and of one string a one-pattern tuple (not its characters)
            include=cast("tuple[str, ...]", include),
            exclude=cast("tuple[str, ...]", exclude),
            sparsegpt_block_size=sparsegpt_block_size,
            sparsegpt_damping=sparsegpt_damping,
            seed=seed,
            activation_storage=activation_storage,
            max_probe_replicas=max_probe_replicas,
            fine_replay_batches=fine_replay_batches,
        )
        self.stages = _check_stages(stages)
        self.save_to = _check_path("save_to", save_to)
        self.save_format = check_save_format(save_format, self.config.structure)
        if not isinstance(overwrite, bool):
            raise ValueError(f"`overwrite` must be True or False, got {overwrite!r}.")
        self.overwrite = overwrite
        if not isinstance(reuse_saved_masks, bool):
            raise ValueError(f"`reuse_saved_masks` must be True or False, got {reuse_saved_masks!r}.")
        self.reuse_saved_masks = reuse_saved_masks
        self._saved_at_step: int | None = None
        self._save_to_export_checked_later = False
        self._run_folders: list[str] = []
        self._checkpoint_step: int | None = None
        if not isinstance(semi_structured, bool):
            raise ValueError(f"`semi_structured` must be True or False, got {semi_structured!r}.")
        if semi_structured:  # before the model is built; the device is checked again once the Trainer placed it
            check_semi_structured(self.config.structure)
        self.semi_structured = semi_structured
        self._on_sparse_kernels = False
        self.report_dir = _check_path("report_dir", report_dir)
        if not isinstance(progress, bool):
            raise ValueError(f"`progress` must be True or False, got {progress!r}.")
        self.progress = progress
        self.pruned = False
        self.masks: dict[str, torch.Tensor] = {}
        self.report: dict[str, Any] | None = None
        self.masks_from: str | None = None
        self._result: PruningResult | None = None
        self._pruning_started = False
        self._announce_masks = False

    @property
    def fine_tuned_to_step(self) -> int | None:
        """The training steps the weights of a pruned checkpoint had after pruning (its ``global_step``, counted as
        :func:`_fine_tuned_to_step` counts a save's); ``None`` for a model this run pruned, or a checkpoint of weights
        as pruned."""
        if self._checkpoint_step is None or not self.pruned:
            return None
        return _fine_tuned_to_step(self.report, self._checkpoint_step)

    @property
    def result(self) -> PruningResult | None:
        """The pruning result (rebuilt from the report after loading a checkpoint); ``None`` before pruning."""
        if self._result is None and self.report is not None:
            self._result = PruningResult.from_dict(self.report, self.masks)
        return self._result

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Fail fast, before any data or device work. Pruning itself waits for the stage's start hook: here the
        # model may still be on the CPU, and a checkpoint's callback state (the "already pruned" flag) is only
        # restored after `setup`.
        model = _pruned_module(pl_module)
        self._run_folders = _run_folders(trainer)
        if self.save_to is not None and (stage in self.stages or stage == TrainerFn.FITTING):
            # Whether a stage writes `save_to` depends on the checkpoint's state, restored only after `setup`: a pruned
            # checkpoint is evaluated without writing anything, and a resumed `fit` replaces the export of the run it
            # continues. So a folder holding an export is checked for emptiness when the stage starts, before pruning.
            export = _read_report(Path(self.save_to) / REPORT_JSON) is not None
            self._check_save_to(model, emptiness_later=export)
            self._save_to_export_checked_later = export
        # A model loaded from a `save_to` folder is not pruned again, so nothing of it is written back.
        if stage in self.stages and self._saved_masks_to_reuse(model) is None:
            _check_offload_folder(model, check_before_pruning(model, self.config))
            if self.report_dir is not None:
                check_writable_folder(self.report_dir, option="report_dir")
        if self.semi_structured:
            self._check_semi_structured(trainer, stage)
        if stage == TrainerFn.FITTING.value and trainer.max_steps != 0 and trainer.max_epochs != 0:
            _check_trainable(model)
        if stage in self.stages and trainer.strategy.restore_checkpoint_after_setup:
            raise ValueError(
                f"ECoFLaPPruning cannot prune under {type(trainer.strategy).__name__}: it shards the parameters and "
                "restores checkpoints only after the model is wrapped. HINT: prune with a DDP or single-device "
                "Trainer and save (`ecoflap prune --pruning.save_to DIR`), then fine-tune DIR under DDP "
                "(`ecoflap fit -c configs/trainer/ddp.yaml --model.init_args.pretrained DIR`)."
            )
        # The checkpoint to restore is not known yet (`trainer.ckpt_path` is set as Lightning loads it, after `setup`),
        # so the loading is what checks it: whole, before any of it is restored (a file the `ecoflap` command already
        # checked is not read again), as under the `ecoflap` command's Trainer.
        use_whole_file_checkpoints(trainer.strategy)
        destroy_gloo_group_at_exit()  # a gloo group left to the interpreter's teardown can abort a finished run

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `on_fit_start` runs after the checkpoint's callback state is restored, after the strategy moved the model
        # to its device (and wrapped it in DDP), and before the sanity check and the first optimizer step. Pruning
        # changes weights in place (same Parameter objects), so the optimizers built by `strategy.setup` stay
        # valid, and their (empty or restored) state is consistent with the masked gradients. The checkpoint folders
        # are known here (`ModelCheckpoint.setup` resolves the default one), so their free space is checked first.
        self._reuse_saved_masks(pl_module)
        if self.pruned and self.save_to is not None:  # masks this run did not prune, saved at the end of `fit`
            where = f"the checkpoint {trainer.ckpt_path}" if self.masks_from == "the checkpoint" else self.masks_from
            check_masks_fit_save_format(self.masks, self.save_format, str(where))
        # A pruned model is saved at the end of `fit`, unless it continues the run that wrote `save_to` (only the masks
        # of a checkpoint tell: a saved model's would also match an export of another fine-tuning of it); a model
        # pruned now is checked before pruning.
        resumed = self.masks_from == "the checkpoint" and self._save_to_holds_this_run()
        if self._save_to_export_checked_later and self.pruned and not resumed:
            self._check_save_to(_pruned_module(pl_module))
        check_checkpoint_room(trainer, {f"masks.{name}": mask for name, mask in self.masks.items()})
        self._ensure_pruned(trainer, pl_module, TrainerFn.FITTING.value)
        for average in _averaged_copies(trainer):
            # A copy of its own of the masks for the averaged copy's device (`mask_weights_` keeps the moved masks).
            mask_weights_(_pruned_module(average), dict(self.masks))
        # A task's own `configure_optimizers` that reads `trainer.estimated_stepping_batches` built the training
        # dataloader before the checkpoint's loops are restored: dropped here, it is built again with their state.
        drop_loader_built_before_restore(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Within `fit` (including the sanity check) this hook must not prune: `on_fit_start` owns that stage.
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._ensure_pruned(trainer, pl_module, TrainerFn.VALIDATING.value)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_pruned(trainer, pl_module, TrainerFn.TESTING.value)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_pruned(trainer, pl_module, TrainerFn.PREDICTING.value)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every backward of Lightning (automatic, an optimizer's closure, `manual_backward`) ends here, before any code
        # of the task can read the gradients: with manual optimization `clip_gradients` and gradient-norm logging come
        # before `optimizer.step()`, so masking only before the step let pruned weights' gradients into the clip norm.
        if self.masks:
            mask_gradients_(_pruned_module(pl_module), self.masks)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Runs after the (accumulated, DDP-reduced, unscaled) gradients are final and before automatic clipping and
        # the step: zeroed gradients keep Adam's moments of pruned weights at zero and leave them out of the clip norm.
        # Masked again after `on_after_backward` for gradients written outside Lightning's backward (a plain
        # `loss.backward()` under manual optimization, another callback).
        if self.masks:
            mask_gradients_(_pruned_module(pl_module), self.masks)
        # A GradScaler skips steps with gradients that are not finite itself (an overflow it cures by a lower scale);
        # under it, only a loss that is not finite is divergence, checked after the batch.
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            _check_finite_gradients(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Zero gradients alone are not a guarantee (decoupled weight decay on a restored momentum, optimizers that
        # step without gradients, other callbacks touching weights), so the weights themselves are re-masked after
        # every training batch: before any validation, logging or checkpoint can see them.
        if self.masks:
            mask_weights_(_pruned_module(pl_module), self.masks)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            _check_finite_loss(trainer, outputs, batch_idx)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Saved again only when training changed the weights since the last save (`ecoflap prune` runs fit with no
        # step: its model is written once, right after pruning). A model taken pruned from a saved folder or a
        # checkpoint is written here even without a step (`ecoflap prune` converting it to another save_format).
        if self.pruned and self.save_to is not None and trainer.global_step != self._saved_at_step:
            self._save(trainer, pl_module, fine_tuned=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A run refused before pruning began (a setup check) has its own message: the notice would only repeat it.
        started = self.pruned or self._pruning_started
        if trainer.state.fn == TrainerFn.FITTING and self.save_to is not None and trainer.is_global_zero and started:
            rank_zero_warn(self._interrupted_save_notice(self.save_to, trainer.global_step))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "pruned": self.pruned,
            "masks": {name: mask.detach().to("cpu", torch.bool) for name, mask in self.masks.items()},
            "report": self.report,
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this before `load_state_dict`, with the whole checkpoint: its step tells how far the
        # restored weights were trained (`validate` and `test` do not restore the loops, so `trainer.global_step` is 0).
        step = checkpoint.get("global_step")
        self._checkpoint_step = step if isinstance(step, int) else None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 1)
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise ValueError(
                f"The checkpoint's ECoFLaPPruning state has version {version!r}; this ecoflap-pl reads versions up to "
                f"{_STATE_VERSION}. HINT: load it with the ecoflap-pl version that wrote it, or upgrade ecoflap-pl."
            )
        self.pruned = bool(state_dict.get("pruned", False))
        self.masks = {name: torch.as_tensor(mask).bool() for name, mask in state_dict.get("masks", {}).items()}
        self.report = state_dict.get("report")
        self.masks_from = "the checkpoint" if self.pruned else None  # the path is known once the stage starts
        if not self.pruned:
            self._checkpoint_step = None  # a dense checkpoint's steps were not taken after pruning
        self._result = None
        if self.pruned and self.report is not None:
            saved, current = self.report.get("config", {}), self.config.to_dict()
            changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
            if changed:
                rank_zero_warn(
                    f"The checkpoint was pruned with other settings ({', '.join(changed)}); its masks are kept and "
                    "the model is not pruned again. HINT: start from the dense model to prune with new settings."
                )

    def check_save_to_before_pruning(self, pl_module: pl.LightningModule) -> None:
        """Refuse now a ``save_to`` that pruning could not write, a folder holding an export included (``setup``
        leaves that one to the stage's start, where the restored checkpoint tells whether anything is written): for
        a caller that knows that the run prunes, before work that would come first.

        Raises:
            FileExistsError, ValueError, PermissionError, OSError: as ``setup``.
        """
        if self.save_to is not None:
            self._check_save_to(_pruned_module(pl_module))

    def check_save_to_before_fit(self, pl_module: pl.LightningModule, ckpt_path: str | Path | None) -> None:
        """Refuse now, after ``setup``, a ``save_to`` holding an export that ``fit`` would replace though the run
        does not continue the one that wrote it: a pruned ``ckpt_path`` of another run, or a model loaded from a
        ``save_to`` folder. ``on_fit_start`` checks the same once the checkpoint is restored; this reads the
        checkpoint's pruning state from the file instead, for a caller that must refuse before the run starts
        processes (each of which would refuse it). A run that prunes is checked by :meth:`check_save_to_before_pruning`.

        Raises:
            FileExistsError, ValueError, PermissionError, OSError: as ``setup``; ValueError also for an unreadable
            checkpoint.
        """
        if self.save_to is None or not self._save_to_export_checked_later:
            return
        model = _pruned_module(pl_module)
        state = self._checkpoint_state(ckpt_path) if ckpt_path is not None else {}
        if state.get("pruned", False):
            if not self._save_to_holds(state.get("report")):
                self._check_save_to(model)
        elif self._saved_masks_to_reuse(model) is not None:
            self._check_save_to(model)

    def checkpoint_is_pruned(self, ckpt_path: str | Path) -> bool:
        """Whether the Lightning checkpoint at ``ckpt_path`` holds this callback's state with a pruned model.

        Read before a run (memory-mapped: the weights are not loaded) by the CLI to plan ``compare_dense``; during
        the run, the state Lightning restores decides as always.

        Raises:
            ValueError: the file is not a readable checkpoint.
        """
        return bool(self._checkpoint_state(ckpt_path).get("pruned", False))

    def _checkpoint_state(self, ckpt_path: str | Path) -> dict[str, Any]:
        """This callback's state in the Lightning checkpoint at ``ckpt_path`` (empty where it has none), read
        memory-mapped: the weights are not loaded.

        Raises:
            ValueError: the file is not a readable checkpoint.
        """
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:  # torch raises several types for files that are not checkpoints
            raise unreadable_checkpoint(ckpt_path, error) from error
        state = checkpoint.get("callbacks", {}).get(self.state_key, {}) if isinstance(checkpoint, dict) else {}
        return state if isinstance(state, dict) else {}

    # ---------------------------------------------------------------- workers

    def _ensure_pruned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._on_sparse_kernels:
            return  # the masked weights already live in 2:4 sparse tensors
        self._reuse_saved_masks(pl_module)
        if self.pruned:
            # Restored from a checkpoint, loaded from a saved pruned model or pruned by an earlier stage: put the
            # masks on the weights' device and make sure the weights honour them.
            mask_weights_(_pruned_module(pl_module), self.masks)
            if self.masks_from == "the checkpoint":
                self.masks_from = f"the checkpoint {trainer.ckpt_path}"
                self._announce_masks = True
            if self._announce_masks:
                self._announce_masks = False
                sparsity = self.result.overall_sparsity if self.result is not None else masks_sparsity(self.masks)
                rank_zero_info(
                    f"The model is already pruned ({100 * sparsity:.1f}% of the candidate weights; masks from "
                    f"{self.masks_from}): `{stage}` uses it as it is, it is not pruned again."
                )
        elif stage in self.stages:
            if self._save_to_export_checked_later:
                self._check_save_to(_pruned_module(pl_module))
            # validate/test/predict hooks run inside Lightning's inference mode: lift it, so that calibration
            # batches are ordinary tensors and first-order scoring can back-propagate.
            with torch.inference_mode(False), torch.enable_grad():
                self._prune(trainer, pl_module, stage)
            self.masks_from = f"pruning at the start of {stage}"
            self._checkpoint_step = None  # a checkpoint without pruning state: its steps trained the dense model
        elif not self.stages:
            # Chosen on purpose (the `dense` preset, or a saved pruned model with `reuse_saved_masks` off): no
            # warning, and no hint to prune.
            rank_zero_info(f"`pruning.stages` is []: `{stage}` runs on the model as it is, without pruning.")
        else:
            rank_zero_warn(
                f"`pruning.stages` is {list(self.stages)}, so `{stage}` runs on the dense model (nothing is pruned). "
                f"HINT: add '{stage}' to pruning.stages to prune before {stage}."
            )
        if self.semi_structured and stage != TrainerFn.FITTING:
            if not self.pruned:
                raise ValueError(
                    f"`semi_structured` runs the masks of a pruned model on sparse kernels, but `{stage}` runs a model "
                    f"this run neither pruned nor restored from a pruned checkpoint or a saved pruned model "
                    f"(pruning.stages is {list(self.stages)}): there are no masks, and the model would run dense. "
                    f"HINT: evaluate a folder `save_to` wrote (--model.init_args.pretrained DIR) or a checkpoint of "
                    f"`ecoflap fit` (--ckpt_path), which carry their masks; or add '{stage}' to pruning.stages with "
                    "structure '2:4' and importance 'uniform' (the model's zeros are kept as its masks)."
                )
            to_semi_structured_(_pruned_module(pl_module), self.masks)
            self._on_sparse_kernels = True

    def _reuse_saved_masks(self, pl_module: pl.LightningModule) -> None:
        """Take the masks of the ``save_to`` folder the model was loaded from, once, unless it is pruned already (a
        checkpoint's masks come first) or ``reuse_saved_masks`` is off."""
        model = _pruned_module(pl_module)
        folder = self._saved_masks_to_reuse(model)
        if folder is None:
            return
        masks = read_masks(folder)
        check_saved_masks(model, masks, folder)
        report = _read_report(folder / REPORT_JSON)
        if report is None and self.save_to is not None:
            raise ValueError(
                f"The saved model {folder} has no readable {REPORT_JSON}, which `save_to` writes beside its weights, "
                f"so the fine-tuned model cannot be saved with its report to {self.save_to}. HINT: put back the "
                f"{REPORT_JSON} exported with the model, or export it again."
            )
        self.masks, self.report, self._result = masks, report, None
        self.pruned = True
        self.masks_from = f"the saved model {folder}"
        self._announce_masks = True

    def _saved_masks_to_reuse(self, model: nn.Module) -> Path | None:
        """The ``save_to`` folder ``model`` was loaded from, whose masks this run takes instead of pruning (None when
        the model is pruned already, ``reuse_saved_masks`` is off, or it comes from no such folder)."""
        if self.pruned or not self.reuse_saved_masks:
            return None
        return saved_model_folder(model)

    def _check_semi_structured(self, trainer: pl.Trainer, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            raise ValueError(
                "`semi_structured` swaps weights for sparse tensors that cannot be trained, so it is for validate, "
                "test and predict only. HINT: fine-tune without it, then evaluate the checkpoint with it."
            )
        check_semi_structured(self.config.structure, trainer.strategy.root_device)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> PruningResult:
        self._pruning_started = True
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
        with (
            StageProgress(self.progress and trainer.is_global_zero, trainer.world_size) as progress,
            OffloadedWeights(model) as offloaded,
        ):
            result = prune(
                model,
                batches,
                loss_fn,
                self.config,
                all_reduce=all_reduce if world_size > 1 else None,
                rank=rank,
                world_size=world_size,
                progress=_stopping_on_sigterm(trainer, progress),
                residency=offloaded if offloaded.modules else None,
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
            "placement": placement(model),  # module -> device of a model dispatched with device_map, else None
            "global_step": _global_step(trainer),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.report = report_dict(result, metadata)
        self._log_to_loggers(trainer, result)
        if trainer.is_global_zero:
            paths = write_report(result, report_dir, metadata)
            logger.info("Pruning report: %s and %s", paths["json"], paths["plot"])
            if self.progress:
                Console().print(render_table(result, trainer.world_size))
                # markup off: brackets in a folder name are part of the path
                Console().print(f"Pruning report: {paths['json']}\nSparsity plot:  {paths['plot']}", markup=False)
        if self.save_to is not None:
            self._save(trainer, pl_module)
        return result

    def check_calibration_data(self, datamodule: pl.LightningDataModule, world_size: int) -> None:
        """Refuse, before a launcher starts the Trainer's processes (DDP), calibration data that pruning would refuse
        in every one of them, each printing the same error: no batch at all, too few batches for ``world_size``
        ranks, none left for ``auto``'s held-out ones.

        Reads only the sizes of the batches, from the calibration loader's batch sampler (no sample is loaded); a
        loader without one is left to pruning, which checks the batches themselves.

        Raises:
            AttributeError: the DataModule has no ``calibration_dataloader``.
            ValueError: as pruning would, with a ``HINT``.
        """
        sampler = getattr(self._calibration_loader(datamodule), "batch_sampler", None)
        if sampler is None:
            return
        sizes = [len(indices) for indices in sampler]
        if not sizes:
            raise _no_calibration_batch(datamodule)
        check_calibration_sizes(sizes, self.config, world_size=world_size, coarse=self.config.scores_groups)

    def _calibration_loader(self, datamodule: pl.LightningDataModule | None) -> Any:
        factory = getattr(datamodule, "calibration_dataloader", None)
        if not callable(factory):
            where = "no DataModule was given" if datamodule is None else f"{type(datamodule).__name__} has none"
            raise AttributeError(
                "ECoFLaPPruning needs calibration data from `trainer.datamodule.calibration_dataloader(num_samples)`, "
                f"but {where}. HINT: use a DataModule from ecoflap_pl.datamodules, or add "
                "`def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader` to your "
                "LightningDataModule and pass it as `datamodule=`."
            )
        return factory(self.config.calibration_samples)

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        # Lightning's DataConnector sets `Trainer.datamodule`, which the Trainer class does not declare.
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        batches = list(self._calibration_loader(datamodule))
        if not batches:
            raise _no_calibration_batch(datamodule)
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
            experiment_logger.log_metrics(metrics, step=_global_step(trainer))

    def _check_save_to(self, model: nn.Module, emptiness_later: bool = False) -> None:
        # Before any pruning: a refusal must come before minutes of work, with the user's files untouched. A folder
        # this run wrote itself (pruned, then fine-tuned) is replaced without `overwrite`. `emptiness_later` leaves a
        # non-empty folder to the stage's start (see `setup`).
        assert self.save_to is not None
        check_save_target(
            self.save_to,
            overwrite=self.overwrite or emptiness_later or self._saved_at_step is not None,
            protected=source_directories(model),
            run_folders=self._run_folders,
            option="save_to",
            least_bytes=least_export_bytes(model, self.save_format, self.config.sparsity),
        )

    def _interrupted_save_notice(self, save_to: str, global_step: int) -> str:
        """What ``save_to`` holds after ``fit`` stopped early (an interrupt or an error)."""
        if not self.pruned:
            return f"`fit` stopped before pruning finished: weights unchanged, nothing saved to {save_to}."
        if not self._save_to_holds_this_run():
            return f"`fit` stopped at step {global_step}: nothing from this run was saved to {save_to}."
        return (
            f"`fit` stopped at step {global_step}: {save_to} holds the model as pruned BEFORE fine-tuning, not "
            "the fine-tuned one. HINT: resume from the last checkpoint with `--ckpt_path`; save_to is written again "
            "when fit ends."
        )

    def _save_to_holds_this_run(self) -> bool:
        """Whether ``save_to`` holds an export of this run's pruning (its report's metadata are this run's: the
        same pruning, restored from a checkpoint of the run that wrote it, or done by this run)."""
        return self.pruned and self._save_to_holds(self.report)

    def _save_to_holds(self, report: dict[str, Any] | None) -> bool:
        """Whether ``save_to`` holds an export of the pruning ``report`` describes (the same report metadata, but for
        what each export adds: the report of a model taken from a saved folder holds that folder's own ``export``)."""
        if report is None or self.save_to is None:
            return False
        saved = _read_report_metadata(Path(self.save_to) / REPORT_JSON)
        return isinstance(saved, dict) and _pruning_run(saved) == _pruning_run(report.get("metadata") or {})

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fine_tuned: bool = False) -> None:
        assert self.save_to is not None and self.result is not None
        _check_finite_weights(_pruned_module(pl_module), self.save_to)
        self._saved_at_step = _global_step(trainer)
        if not trainer.is_global_zero:
            return
        to_step = _fine_tuned_to_step(self.report, trainer.global_step if fine_tuned else None)
        saved = save_pruned(
            _pruned_module(pl_module),
            self.save_to,
            masks=self.masks,
            save_format=self.save_format,
            processors=[getattr(pl_module, name, None) for name in ("processor", "tokenizer")],
            result=self.result,
            metadata=(self.report or {}).get("metadata"),
            fine_tuned_to_step=to_step,
        )
        if self.progress:
            what = "Pruned model" if to_step is None else f"Pruned model fine-tuned to step {to_step}"
            Console().print(describe_saved(saved, self.save_to, what), markup=False)


def keep_pruning_state_in_weights_only_checkpoint(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Add the state of the Trainer's :class:`ECoFLaPPruning` (the masks, the report, the ``pruned`` flag) to a
    checkpoint that Lightning writes without the callbacks' state.

    A weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``, ``trainer.save_checkpoint(path,
    weights_only=True)``) holds no callback state, so without this its masks would be lost: ``validate --ckpt_path``
    of it would prune the pruned model again, with other masks. Lightning still calls the LightningModule's
    ``on_save_checkpoint`` for it, and :class:`~ecoflap_pl.tasks.base.EcoflapTask` calls this from there. The state
    is stored where a full checkpoint keeps it, so Lightning restores it the same way. Such a checkpoint still cannot
    resume ``fit`` (no optimizer state): the ``ecoflap`` command refuses that before the model is built, Lightning
    when it restores the optimizers; ``EcoflapTrainer.prune``, which takes no step, restores it without them.
    """
    if "callbacks" in checkpoint:  # a full checkpoint: the callbacks' state is there already
        return
    states = {
        callback.state_key: callback.state_dict()
        for callback in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(callback, ECoFLaPPruning) and callback.pruned
    }
    if states:
        checkpoint["callbacks"] = states


def unreadable_checkpoint(ckpt_path: str | Path, error: BaseException) -> ValueError:
    """The error for a ``ckpt_path`` that ``torch.load`` refused, saying what is wrong with the file.

    torch's own message is left out where it misleads: for a file that is no zip archive it advises loading with
    ``weights_only=False`` (running the file's code), and for an empty file it is empty.
    """
    path = Path(ckpt_path)
    if path.is_file() and path.stat().st_size == 0:
        problem = "the file is empty"
    elif path.is_file() and not zipfile.is_zipfile(path):
        problem = "it is not a complete zip archive, as the Trainer writes checkpoints (cut short, or another file)"
    else:
        problem = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"`ckpt_path` {str(ckpt_path)!r} cannot be read as a Lightning checkpoint: {problem}. HINT: pass a complete "
        "`.ckpt` file written by the Trainer (a copy interrupted mid-write is truncated)."
    )


def _pruning_run(metadata: dict[str, Any]) -> dict[str, Any]:
    """A report's metadata less its ``export`` entry: what identifies the pruning run."""
    return {key: value for key, value in metadata.items() if key != "export"}


def _fine_tuned_to_step(report: dict[str, Any] | None, global_step: int | None) -> int | None:
    """The training steps the weights have had since pruning, at this run's ``global_step`` (``None``: weights as
    pruned, or as the saved model they were taken from had them): after those recorded by the saved model the run
    started from (its report's ``export.fine_tuned_to_step``), all of this run's steps; for the run's own pruning (a
    report without ``export``), those after the step it pruned at, the report's ``global_step`` (a dense checkpoint's
    steps before it trained the dense model)."""
    metadata = (report or {}).get("metadata") or {}
    export = metadata.get("export")
    before = export.get("fine_tuned_to_step") if isinstance(export, dict) else None
    pruned_at = metadata.get("global_step") if export is None else 0
    steps = 0 if global_step is None else global_step - (pruned_at if isinstance(pruned_at, int) else 0)
    if not steps:
        return before if isinstance(before, int) else None
    return (before if isinstance(before, int) else 0) + steps


def _run_folders(trainer: pl.Trainer) -> list[str]:
    """The folders ``trainer`` writes its own files into: its root (the saved config; checkpoints without a logger),
    its loggers' and its checkpoint callbacks' folders (those that name one before their ``setup``)."""
    folders: list[str | Path | None] = [trainer.default_root_dir, *(logger.save_dir for logger in trainer.loggers)]
    folders += [callback.dirpath for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    return [str(folder) for folder in folders if folder]


def _read_report(path: Path) -> dict[str, Any] | None:
    """The pruning report at ``path``; ``None`` where there is none, or it is not a report (a JSON object)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _read_report_metadata(path: Path) -> dict[str, Any] | None:
    return (_read_report(path) or {}).get("metadata")


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
            raise SIGTERMException(SIGTERM_STATUS)
        progress(stage, done, total)

    return report


def _no_calibration_batch(datamodule: pl.LightningDataModule) -> ValueError:
    return ValueError(
        f"The calibration dataloader of {type(datamodule).__name__} yielded no batch: the split it samples "
        "(the training split for ecoflap_pl DataModules) is empty. HINT: check the training annotations under "
        "`data_dir`; pruning needs at least one calibration sample."
    )


def _check_finite_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Stop fine-tuning before an optimizer step that would write NaN or infinite values into the weights.

    One fused norm over every gradient decides (a non-finite norm of finite but huge gradients is no error); only
    then are the tensors looked at one by one, to name them. With several processes, they agree first (one boolean
    reduced), so that every rank stops at the same step, also where each holds only a shard of the gradients.

    Raises:
        FloatingPointError: a gradient holds NaN or infinite values (the loss diverged); the step is not taken.
    """
    named = [(name, param.grad) for name, param in pl_module.named_parameters() if param.grad is not None]
    norm_finite = not named or bool(torch.isfinite(torch.nn.utils.get_total_norm([grad for _, grad in named])))
    bad = [] if norm_finite else [name for name, grad in named if not bool(torch.isfinite(grad).all())]
    finite = not bad
    if trainer.world_size > 1:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if not finite:
        where = f"the gradients of {_some(bad)}" if bad else "the gradients on another process"
        raise FloatingPointError(
            f"Fine-tuning diverged at step {trainer.global_step}: {where} hold NaN or infinite values (the loss is no "
            "longer finite), so that step was not taken. HINT: lower `model.init_args.learning_rate`, set "
            "`trainer.gradient_clip_val`, or check the training data."
        )


def _check_finite_loss(trainer: pl.Trainer, outputs: Any, batch_idx: int) -> None:
    """Stop fine-tuning under a ``GradScaler`` (``16-mixed`` on GPUs) once the training loss is NaN or infinite.

    The scaler skips every step whose gradients are not finite and lowers its scale, which cures an overflow of the
    scaled gradients but never a loss that is not finite (the scale multiplies the loss only after it is computed):
    without this, such a run skipped every step to its end, without a word, and was saved as fine-tuned. With several
    processes, they agree first (one boolean reduced), so that every rank stops at the same batch.

    Raises:
        FloatingPointError: the loss of this batch (on this or another process) is not finite; no step took its
            gradients.
    """
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # no loss returned: nothing to check
    here = not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all())
    finite = trainer.strategy.reduce_boolean_decision(here, all=True) if trainer.world_size > 1 else here
    if not finite:
        where = "the training loss" if not here else "the training loss on another process"
        raise FloatingPointError(
            f"Fine-tuning diverged at epoch {trainer.current_epoch}, batch {batch_idx}: {where} is NaN or infinite. "
            "The GradScaler of `16-mixed` skips every optimizer step with its gradients (no weight took them), and "
            "would skip every later one without end, so training stops here. HINT: lower "
            "`model.init_args.learning_rate`, set `trainer.gradient_clip_val`, use `trainer.precision: bf16-mixed`, "
            "or check the training data."
        )


def _check_finite_weights(model: nn.Module, save_to: str) -> None:
    """Refuse to write a model whose weights hold NaN or infinite values over ``save_to`` (offloaded weights are read
    from where they are stored, one at a time).

    Raises:
        FloatingPointError: naming the weights; ``save_to`` is left as it is.
    """
    stored = StoredTensors(model)
    bad = [name for name, _ in model.named_parameters() if not bool(torch.isfinite(stored[name]).all())]
    if bad:
        raise FloatingPointError(
            f"The weights {_some(bad)} hold NaN or infinite values, so the model was not saved: {save_to} is left as "
            "it was. HINT: lower `model.init_args.learning_rate` or set `trainer.gradient_clip_val`, then resume from "
            "an earlier checkpoint with `--ckpt_path`."
        )


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _global_step(trainer: pl.Trainer) -> int:
    """The Trainer's global step, also while ``fit`` restores a checkpoint: Lightning restores the loops, and with them
    the step, only after ``on_fit_start`` (where pruning happens), so there the step is the checkpoint's. Read as the
    Trainer's, a model trained to step N, then pruned by ``fit`` or ``prune --ckpt_path``, was reported as pruned at
    step 0 and saved again when the run ended, as if fine-tuned after pruning to step N."""
    restoring = trainer._checkpoint_connector._loaded_checkpoint  # emptied once the loops are restored
    return int(restoring.get("global_step", trainer.global_step)) if restoring else trainer.global_step


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


def _averaged_copies(trainer: pl.Trainer) -> list[pl.LightningModule]:
    """The copies of the LightningModule that Lightning's weight-averaging callbacks average the weights into
    (``WeightAveraging``, ``EMAWeightAveraging``, ``StochasticWeightAveraging``), where they exist already.

    They copy the model as ``setup`` finds it: dense, before pruning. The average starts over from the model at its
    first update, but until then (``EMAWeightAveraging(update_starting_at_step=...)``, an SWA start epoch) their
    checkpoints store that copy as the model's weights, and the end of training copies it into the model. Read from
    their private ``_average_model`` (an ``AveragedModel`` wrapping the copy, or the copy itself): Lightning gives no
    public access to it.
    """
    copies = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        average = getattr(callback, "_average_model", None)
        if isinstance(average, AveragedModel):
            average = average.module
        if isinstance(average, pl.LightningModule):
            copies.append(average)
    return copies


def _check_trainable(model: nn.Module) -> None:
    """Refuse to fine-tune a model with offloaded weights (Accelerate's ``device_map`` with CPU or disk offload).

    Each forward call of an offloaded module loads a fresh copy of its weights and drops it afterwards: the gradients
    land on that copy, the module's own parameters (on the ``meta`` device) get none, and the optimizer skips them
    without a word, so fine-tuning would silently leave every offloaded weight as it was.
    """
    offloaded = OffloadedWeights(model).modules
    if offloaded:
        shown = ", ".join(offloaded[:3]) + (f" and {len(offloaded) - 3} more" if len(offloaded) > 3 else "")
        raise ValueError(
            f"Fine-tuning cannot update offloaded weights: {shown} keep their weights in CPU memory or on disk "
            "(device_map) and load a copy for each forward, so their gradients are dropped and the optimizer never "
            "updates them. HINT: prune and save with `ecoflap prune` (pruning.save_to), then fine-tune the saved model "
            "placed on devices only (a device_map without 'cpu' or 'disk', or a model that fits one device)."
        )


def _check_offload_folder(model: nn.Module, candidates: Sequence[str]) -> None:
    """Refuse, before pruning, candidate weights offloaded to disk whose pruned values would have nowhere to go.

    Raises:
        ValueError: naming the modules and the option that fixes it.
    """
    stuck = OffloadedWeights(model).unwritable(candidates)
    if stuck:
        raise ValueError(
            f"The weights of {_some(stuck)} are offloaded to disk and read from the model's own files, and there is "
            "no offload folder to write their pruned values to. HINT: add --model.init_args.offload_folder DIR (a "
            "folder with room for the offloaded part; from Python, from_pretrained(..., offload_folder=DIR)), or "
            "raise max_memory so that they are held in memory."
        )


def _calibration_context(trainer: pl.Trainer) -> Callable[[], AbstractContextManager[Any]]:
    """The forward context of the calibration loss.

    True-precision plugins (``bf16-true``, ``16-true``) hold the model in that dtype, so the forward runs in their
    context as in training. Mixed precision is left out on purpose: autocast to 16 bits would drown the ±ε
    differences of the zeroth-order probes, and the engine's statistics are fp32 anyway.
    """
    plugin = trainer.precision_plugin
    return nullcontext if isinstance(plugin, MixedPrecision) else plugin.forward_context
