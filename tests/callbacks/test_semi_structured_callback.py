"""``semi_structured`` in the callback: refused on the CPU and for fit, before any pruning."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ecoflap_pl.callbacks import ECoFLaPPruning
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask
from tests.trainers import quiet_trainer

TWO_FOUR = {**FAST, "structure": "2:4", "importance": "uniform", "semi_structured": True}


def trainer(tmp_path: Path, callback: ECoFLaPPruning) -> pl.Trainer:
    return quiet_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[callback])


def test_refused_on_the_cpu_before_pruning(tmp_path: Path) -> None:
    """On a machine without a GPU when the callback is built (before the model is); on a GPU machine, for a Trainer
    on the CPU, at setup."""
    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    with pytest.raises(ValueError, match="`semi_structured` needs a CUDA GPU .* HINT"):
        callback = ECoFLaPPruning(**TWO_FOUR, stages=["validate"])
        trainer(tmp_path, callback).validate(task, datamodule=ToyData())
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in before.items())


def test_refused_for_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the no-GPU check the callback makes first
    callback = ECoFLaPPruning(**TWO_FOUR)
    with pytest.raises(ValueError, match="for validate, test and predict only"):
        trainer(tmp_path, callback).fit(ToyTask(), datamodule=ToyData())


def test_refused_when_there_are_no_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating a shipped 2:4 model with `stages: []` ran it dense without a word: the callback had no masks."""
    import ecoflap_pl.callbacks.pruning as pruning_callback

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the no-GPU checks, which are not tested here
    monkeypatch.setattr(pruning_callback, "check_semi_structured", lambda *_: None)
    callback = ECoFLaPPruning(**TWO_FOUR, stages=[])
    with pytest.raises(ValueError, match=r"this run neither pruned .* HINT: .* or add 'validate' to"):
        trainer(tmp_path, callback).validate(ToyTask(), datamodule=ToyData())
