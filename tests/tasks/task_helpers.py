"""Helpers shared by the task tests (imported as ``tests.tasks.task_helpers``)."""

from __future__ import annotations

from collections.abc import Callable
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


def validate_once_twice_and_on_two_processes(
    task: EcoflapTask, samples: list[dict[str, Any]], id_key: str, trainer_factory: Callable[..., pl.Trainer]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """``trainer.validate`` metrics of ``samples`` (an odd number, batches of 2): on one process; on one process with
    sample 0 once more under a new ``id_key`` (its repeat counted again: what sums over samples gave under DDP); and
    on 2 CPU processes (DDP), whose padding ``DistributedSampler`` gives rank 1 a repeat of sample 0."""
    if len(samples) % 2 == 0:
        raise ValueError(f"`samples` must be an odd number for the sampler to pad, got {len(samples)}.")
    again = [*samples, {**samples[0], id_key: f"{samples[0][id_key]}-again"}]
    results = []
    for split, settings in ((samples, {}), (again, {}), (samples, {"strategy": "ddp_spawn", "devices": 2})):
        loader = DataLoader(split, batch_size=2, collate_fn=task.collator)
        trainer = trainer_factory(use_distributed_sampler=True, **settings)
        (metrics,) = trainer.validate(task, dataloaders=loader, verbose=False)
        results.append(metrics)
    return results[0], results[1], results[2]
