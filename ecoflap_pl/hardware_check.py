"""Check the Trainer's hardware settings (``accelerator``, ``devices``, ``strategy``, ``precision``, ``num_nodes``)
before the task builds its model.

LightningCLI builds the model first and the Trainer last, so a GPU that is not there (every experiment file and
``configs/trainer/gpu.yaml`` ask for one) was refused only after minutes of loading a large model, in Lightning's one
line ("No supported gpu backend found!") without a word on the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

HARDWARE_SETTINGS = ("accelerator", "devices", "strategy", "precision", "num_nodes")
"""The ``trainer:`` settings Lightning checks against the machine when the Trainer is built."""

_GPU_ACCELERATORS = ("gpu", "cuda")


def check_trainer_hardware(trainer_settings: Mapping[str, Any]) -> None:
    """Build a Trainer from the hardware settings alone, which costs milliseconds, so that what Lightning refuses
    (a GPU on a machine without one, more devices than there are, a strategy the accelerator cannot run) is refused
    before the model is built.

    Settings given as classes (a ``class_path`` mapping, built only by the parser) are left to the real Trainer.

    Args:
        trainer_settings: the ``trainer:`` section of the parsed configuration.

    Raises:
        ValueError: a setting Lightning refuses, with its message and a ``HINT``.
    """
    given: dict[str, Any] = {
        key: trainer_settings.get(key) for key in HARDWARE_SETTINGS if trainer_settings.get(key) is not None
    }
    if any(isinstance(value, Mapping) or hasattr(value, "class_path") for value in given.values()):
        return
    # The Trainer logs its hardware banner and any strategy advice once more when the run builds the real one.
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.ERROR)
    try:
        pl.Trainer(
            **given,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{_describe(given)}: {error}\n{_hint(given)}") from error
    finally:
        lightning_logger.setLevel(level)


def _describe(given: Mapping[str, Any]) -> str:
    settings = ", ".join(f"{key}={value!r}" for key, value in given.items())
    return f"The trainer settings ({settings or 'defaults'}) do not fit this machine"


def _hint(given: Mapping[str, Any]) -> str:
    if str(given.get("accelerator", "")).lower() in _GPU_ACCELERATORS and not torch.cuda.is_available():
        return (
            "HINT: torch sees no CUDA GPU here (torch.cuda.is_available() is False; check the driver and "
            "CUDA_VISIBLE_DEVICES). The experiment files and configs/trainer/{gpu,ddp}.yaml ask for one; to run on the "
            "CPU, add --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto."
        )
    return "HINT: fix trainer.accelerator, devices, strategy or precision (see `ecoflap fit --help`)."
