"""Helpers shared by the task tests (imported as ``tests.tasks.task_helpers``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ecoflap_pl.tasks.base import EcoflapTask


def fit_changed_weights(task: EcoflapTask, trainer: pl.Trainer, samples: list[dict[str, Any]]) -> set[str]:
    """Fit ``task`` on ``samples`` (batches of 2 through its collator); return the names of the weights that changed."""
    before = {name: param.detach().clone() for name, param in task.model.named_parameters()}
    trainer.fit(task, train_dataloaders=DataLoader(samples, batch_size=2, collate_fn=task.collator))
    return {name for name, param in task.model.named_parameters() if not torch.equal(param, before[name])}
