"""Check the Trainer's hardware settings (``accelerator``, ``devices``, ``strategy``, ``precision``, ``num_nodes``)
and the model's placement (``device_map``, ``max_memory``) before the task builds its model.

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


def check_model_placement(model_arguments: Mapping[str, Any]) -> None:
    """:func:`check_device_map` on a task's arguments: its ``device_map`` and ``max_memory``, or those keys of its
    ``from_pretrained_kwargs``."""
    extra = model_arguments.get("from_pretrained_kwargs") or {}
    check_device_map(
        model_arguments.get("device_map") or extra.get("device_map"),
        model_arguments.get("max_memory") or extra.get("max_memory"),
    )


def check_device_map(device_map: Any, max_memory: Mapping[Any, Any] | None = None) -> None:
    """Refuse a ``device_map`` or ``max_memory`` that puts weights on a CUDA GPU when torch sees none, before the model
    is built: ``from_pretrained`` fails at once inside torch ("Found no NVIDIA driver on your system"), with a
    traceback and no word on the fix. ``auto`` (``balanced``, ``sequential``) alone places the model on the CPU (and
    disk) there, and is left to do so.

    Args:
        device_map: ``from_pretrained``'s ``device_map``: a strategy name, a device (``"cuda:0"``, ``0``, ``"cpu"``)
            or a dict module name -> device.
        max_memory: ``from_pretrained``'s ``max_memory``: device (a GPU index, ``"cpu"``, ``"disk"``) -> size.

    Raises:
        ValueError: naming the GPU places, with the CPU alternatives as a ``HINT``.
    """
    if torch.cuda.is_available():
        return
    if isinstance(device_map, Mapping):
        places = [f"{key!r}: {value!r}" for key, value in device_map.items() if _names_a_gpu(value)]
    else:
        places = [repr(device_map)] if device_map is not None and _names_a_gpu(device_map) else []
    places += [f"max_memory key {key!r}" for key in max_memory or {} if _names_a_gpu(key)]
    if not places:
        return
    raise ValueError(
        f"`device_map` {device_map!r}{f' with max_memory {max_memory!r}' if max_memory else ''} puts weights on a CUDA "
        f"GPU ({', '.join(places)}), but torch sees none here (torch.cuda.is_available() is False). HINT: on the CPU, "
        "use device_map: cpu, or device_map: auto with max_memory for 'cpu' and 'disk' only (and an offload_folder), "
        "or drop device_map; on a GPU machine, check the driver and CUDA_VISIBLE_DEVICES."
    )


def _names_a_gpu(place: Any) -> bool:
    """Whether a ``device_map`` value or ``max_memory`` key is a CUDA device: an index (``0``, ``"0"``), ``cuda``,
    ``cuda:N`` or a CUDA ``torch.device``."""
    if isinstance(place, torch.device):
        return place.type == "cuda"
    if isinstance(place, bool):
        return False
    if isinstance(place, int):
        return True
    text = str(place).strip().lower()
    return text.isdigit() or text == "cuda" or text.startswith("cuda:")
