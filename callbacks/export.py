"""The callback's side of ``save_to``: which folders to protect, and one atomic write of model, processor and report."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ecoflap_pl.export import SavedModel, atomic_directory, has_saved_masks, write_model_card, write_pruned_model
from ecoflap_pl.models.placement import OffloadedWeights, StoredTensors
from ecoflap_pl.pruning import PruningResult
from ecoflap_pl.reporting import write_report

logger = logging.getLogger(__name__)


def source_directories(model: nn.Module) -> list[Path]:
    """Local folders holding the weights ``model`` was loaded from (a Hugging Face ``name_or_path`` that exists), and
    those its offloaded weights live in (``device_map``'s offload folder: pruning writes the pruned ones there, and
    the model reads them from there until it ends)."""
    name_or_path = getattr(model, "name_or_path", None)
    found = [Path(folder) for folder in OffloadedWeights(model).folders]
    if isinstance(name_or_path, str) and name_or_path and Path(name_or_path).expanduser().is_dir():
        found.insert(0, Path(name_or_path).expanduser())
    return found


def saved_model_folder(model: nn.Module) -> Path | None:
    """The folder written by ``save_to`` (with its masks) that ``model`` was loaded from: a Hugging Face model's
    ``name_or_path``, or the folder of the file a timm model's ``pretrained_cfg_overlay`` loaded; ``None`` for any
    other model (a hub name, random weights, a folder without masks)."""
    name_or_path = getattr(model, "name_or_path", None)
    weights_file = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    if isinstance(name_or_path, str) and name_or_path:
        folder = Path(name_or_path).expanduser()
    elif isinstance(weights_file, str) and weights_file:
        folder = Path(weights_file).expanduser().parent
    else:
        return None
    return folder if has_saved_masks(folder) else None


def check_saved_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Refuse masks read from ``folder`` that do not fit ``model`` (loaded from it): each must name a parameter of the
    same shape, whose weights are zero wherever the mask prunes (offloaded weights are read from their store).

    Raises:
        ValueError: naming the first mask that does not fit, and how to go on.
    """
    parameters = dict(model.named_parameters())
    again = "or set `pruning.reuse_saved_masks: false` to prune the model anew"
    misfits = [name for name, mask in masks.items() if name not in parameters or parameters[name].shape != mask.shape]
    if misfits:
        found = f"it is {list(parameters[misfits[0]].shape)}" if misfits[0] in parameters else "the model has none"
        raise ValueError(
            f"The masks saved in {folder} do not fit the model loaded from it: the mask of {misfits[0]!r} is "
            f"{list(masks[misfits[0]].shape)}, but {found}. HINT: the masks file was copied from another export; "
            f"export the model again, {again}."
        )
    stored = StoredTensors(model)
    for name, mask in masks.items():
        weight = stored[name]
        unmasked = int(torch.count_nonzero(weight[~mask.to(weight.device)]))
        if unmasked:
            raise ValueError(
                f"The weights in {folder} are not zero where its masks prune them ({unmasked} nonzero weights of "
                f"{name!r}), so they are not the weights `save_to` wrote with those masks. HINT: the folder's weights "
                f"were changed after it was saved; export the pruned model again, {again}."
            )


def save_pruned(
    model: nn.Module,
    target: str | Path,
    *,
    masks: Mapping[str, torch.Tensor],
    save_format: str,
    processors: Iterable[object],
    result: PruningResult,
    metadata: Mapping[str, Any] | None,
    fine_tuned_to_step: int | None = None,
) -> SavedModel:
    """Write ``model``, its ``processors``, the pruning report and the model card (``README.md``, for the Hugging Face
    Hub; ``fine_tuned_to_step`` says the weights were fine-tuned after pruning) into ``target`` at once, replacing what
    was there.

    The files are written into a folder beside ``target`` that takes its place only when complete
    (:func:`~ecoflap_pl.export.atomic_directory`); check ``target`` before pruning with
    :func:`~ecoflap_pl.export.check_save_target`.

    Raises:
        OSError: a write failed (disk full, no permission, a file-size limit), naming ``target``, which is unchanged.
    """
    try:
        with atomic_directory(target) as partial:
            saved = write_pruned_model(model, partial, dict(masks), save_format, processors)
            # The training steps are recorded, so that fine-tuning the saved model again counts on from them.
            export = {**saved.to_dict(), "fine_tuned_to_step": fine_tuned_to_step}
            write_report(result, partial, {**(metadata or {}), "export": export})
            write_model_card(partial, model, result, saved, metadata, fine_tuned_to_step=fine_tuned_to_step)
    except (OSError, SafetensorError) as error:  # safetensors reports a failed write as its own error type
        errno = error.errno if isinstance(error, OSError) else None
        message = (
            f"The pruned model could not be written to {target} ({os.strerror(errno) if errno else error}); {target} "
            f"is as it was before. HINT: free space or fix the permissions in {Path(target).parent}, or set "
            "`pruning.save_to` to another folder."
        )
        raise (OSError(errno, message) if errno else OSError(message)) from error
    logger.info("%s", describe_saved(saved, target))
    return saved


def describe_saved(saved: SavedModel, target: str | Path, what: str = "Pruned model") -> str:
    """One line: ``what`` was saved where, in which format, and its size on disk beside the dense size."""
    share = 100 * saved.weights_bytes / max(saved.dense_bytes, 1)
    return (
        f"{what} saved to {target} ({saved.save_format}): weights {_megabytes(saved.weights_bytes)} on disk, "
        f"{share:.0f}% of the dense {_megabytes(saved.dense_bytes)}"
    )


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
