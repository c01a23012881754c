"""The contract every task LightningModule keeps with the pruning callback, the DataModules and the CLI."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ecoflap_pl.callbacks.pruning import keep_pruning_state_in_weights_only_checkpoint
from ecoflap_pl.datamodules.base import EcoflapDataModule
from ecoflap_pl.datamodules.resumable import (
    drop_loader_built_before_restore,
    resume_after_epoch_end_as_at_its_last_batch,
    warn_without_loader_state_at_epoch_end,
)
from ecoflap_pl.process_group import destroy_gloo_group_at_exit
from ecoflap_pl.tasks.step_seeds import STEP_SEED, base_step_seed, restored_step_seed, seed_training_batch


class EcoflapTask(pl.LightningModule):
    """Base class of the task modules.

    A task owns one network (``self.model``, the module the pruning callback prunes), a picklable
    ``collator`` that turns the plain sample dicts of the DataModules into model batches, and
    ``calibration_loss(batch)``: the model's own training loss, the signal ECoFLaP scores with.

    Args:
        learning_rate: peak AdamW learning rate for fine-tuning after pruning.
        weight_decay: AdamW weight decay (0.05 in the paper's BLIP fine-tuning runs).
        warmup_steps: linear warm-up steps before the cosine decay.
    """

    model: nn.Module
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __init__(self, learning_rate: float = 1e-5, weight_decay: float = 0.05, warmup_steps: int = 0) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {learning_rate!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps!r}.")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self._restored_step_seed: int | None = None
        self._step_seed = 0

    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The scalar training loss of ``self.model`` on ``batch`` (docs/algorithm.md §2)."""
        raise NotImplementedError(f"{type(self).__name__} must define calibration_loss(batch).")

    @override
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> EcoflapTask:
        """Move or cast the task, except a model dispatched by Accelerate (``device_map``): its hooks keep each
        module on the device that holds it (and offloaded weights off every device)."""
        model = self._modules.get("model")
        if model is None or not getattr(model, "hf_device_map", None):
            return super()._apply(fn, recurse)
        del self._modules["model"]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["model"] = model

    @override
    def setup(self, stage: str) -> None:
        """Have a gloo process group (DDP on CPUs) destroyed before this process exits: left to the interpreter's
        teardown it can abort a finished run (``ecoflap_pl/process_group.py``). Overrides call ``super().setup``."""
        destroy_gloo_group_at_exit()

    @override
    def on_fit_start(self) -> None:
        """Fine-tune in training mode.

        ``from_pretrained`` leaves Hugging Face models in eval mode and Lightning keeps the modes it finds, so
        without this fine-tuning would run without dropout. Override it to keep parts of a model frozen in eval mode.
        """
        self.train()

    @override
    def on_train_start(self) -> None:
        """Take the base seed of the training steps (``ecoflap_pl/tasks/step_seeds.py``): the restored checkpoint's,
        else ``seed_everything``'s, else one drawn from torch's generator. Overrides call ``super().on_train_start``."""
        self._step_seed = base_step_seed(self.trainer, self._restored_step_seed)
        self._restored_step_seed = None

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the global generators for this batch, so that a resumed fit draws the dropout masks and augmentations
        of the uninterrupted run. Overrides call ``super().on_train_batch_start``."""
        seed_training_batch(self._step_seed, self.trainer, batch_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the pruning masks in weights-only checkpoints too (Lightning leaves the callbacks' state out of them),
        and the base seed of the training steps. Overrides call ``super().on_save_checkpoint``."""
        keep_pruning_state_in_weights_only_checkpoint(self.trainer, checkpoint)
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint[STEP_SEED] = self._step_seed

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume a run with ``max_steps`` from a checkpoint saved at an epoch's end as an uninterrupted run goes on
        (:func:`~ecoflap_pl.datamodules.resumable.resume_after_epoch_end_as_at_its_last_batch`), warn when such a
        checkpoint has no state of an ecoflap-pl training dataloader, and go on with the base seed of its training
        steps. Overrides call ``super().on_load_checkpoint``."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return  # `validate`, `test` and `predict` do not restore the loops
        self._restored_step_seed = restored_step_seed(checkpoint)
        if isinstance(getattr(self.trainer, "datamodule", None), EcoflapDataModule):  # set by fit, not declared
            warn_without_loader_state_at_epoch_end(self.trainer, checkpoint)
        resume_after_epoch_end_as_at_its_last_batch(self.trainer, checkpoint)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.calibration_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        """AdamW with linear warm-up and cosine decay to 0 at the last step (the peak rate after the warm-up where the
        Trainer has no last step); no weight decay on biases and norms (BLIP's recipe)."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        # The fused kernel updates every tensor in one pass (about 2.5x faster than the default on CPU for the
        # demo BLIP-2) and computes in fp32 whatever the weights' dtype: under `16-true` the default kernel computes
        # in fp16, where `eps` (1e-8) is 0, so a zero or small gradient (its square underflows) made the weight NaN or
        # infinite at the first step. It serves floating-point tensors on CPU and CUDA, and Lightning refuses to clip
        # gradients under mixed precision for an optimizer that unscales them itself, as a fused one does (FSDP's
        # plugin would clip the scaled gradients): there, and on other devices, the default.
        clipped_under_mixed = bool(self.trainer.gradient_clip_val) and "mixed" in str(self.trainer.precision)
        fused = not clipped_under_mixed and all(
            param.is_floating_point() and param.device.type in ("cpu", "cuda") for param in decay + no_decay
        )
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate,
            fused=fused or None,
        )
        total = self.trainer.estimated_stepping_batches
        drop_loader_built_before_restore(self.trainer)  # also for a fit without the pruning callback
        endless = math.isinf(total)
        if endless:
            # Training without a known end (max_steps and max_epochs -1, stopped by max_time or a callback, or an
            # iterable dataset without a length): a cosine decay has no end to decay to.
            rank_zero_warn(
                "The number of training steps is unknown (`trainer.max_steps` and `trainer.max_epochs` are -1, or the "
                "training data has no length), so the learning rate stays at `learning_rate` after the warm-up, "
                "without the cosine decay. HINT: set `trainer.max_steps` to decay it to 0 over that many steps."
            )
        total = max(int(total), 1) if not endless else total
        warmup = min(self.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if endless:
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 1
