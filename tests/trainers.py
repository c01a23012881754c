"""The quiet single-process CPU ``Trainer`` the tests build (imported as ``tests.trainers``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(trainer_class: type[pl.Trainer] = pl.Trainer, **settings: Any) -> pl.Trainer:
    """A one-device CPU ``Trainer`` (or ``trainer_class``, such as the CLI's ``EcoflapTrainer``) without logger,
    checkpoints, progress bar or model summary; ``settings`` (steps, callbacks, ``default_root_dir``, ...) go to the
    ``Trainer`` and win over these defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return trainer_class(**{**defaults, **settings})
