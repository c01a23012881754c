"""Lightning checkpoint files: written whole (never a cut file under the checkpoint's name), checked whole before any
of it is loaded, and room for one checked before training starts."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from ecoflap_pl.export import check_free_space, tensor_bytes
from ecoflap_pl.export.atomic import atomic_file, remove_stale_partial_files

_CHUNK = 1 << 24
# The name of a checkpoint being written holds no part of its final name (see WholeFileCheckpointIO).
_PARTIAL_PREFIX, _PARTIAL_SUFFIX = ".ecoflap-checkpoint-", ".partial"
# The checkpoints found whole, as a JSON list of [file, size, modification time], kept in the environment so that the
# processes Lightning starts for the other ranks of a node (which inherit it) do not read them again.
CHECKED_CHECKPOINTS_VARIABLE = "ECOFLAP_CHECKED_CHECKPOINTS"


def check_checkpoint_file(ckpt_path: str | Path) -> None:
    """Refuse a checkpoint whose bytes changed after the Trainer wrote it (a bad disk, a damaged copy).

    ``torch.load`` does not check the CRC-32 that ``torch.save`` records for each entry of the archive, so a changed
    byte inside a tensor loads silently as a wrong weight. :mod:`zipfile` checks it while reading an entry, so every
    entry is read through once here. Entries saved without a checksum (``compute_crc32`` off in
    ``torch.serialization.config``, recorded as 0) cannot be checked and are skipped. A file that is no zip archive at
    all is left to ``torch.load``, whose refusal names the problem.

    Reading the whole file takes about as long as loading it (1.5 GiB: 0.71 s warm and 1.44 s cold, against 0.93 and
    1.01 s for ``torch.load``; ``benchmarks/RESULTS.md``), so a file found whole is not read again: its path, size and
    modification time are kept in the environment variable ``ECOFLAP_CHECKED_CHECKPOINTS``, which the processes
    Lightning starts for the other DDP ranks of the node inherit (the ``ecoflap`` command checks before they start).
    Processes started together by an external launcher (``torchrun``, ``srun``) each check, in parallel: sharing one
    process's verdict would leave the others waiting for as long (two checks at once took 1.15 s where one took
    0.71 s).

    Raises:
        ValueError: an entry does not match its checksum, or the archive's directory is damaged.
    """
    path = Path(ckpt_path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    stat = path.stat()
    checked = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    found_whole = _checked_checkpoints()
    # The `ecoflap` command checks before the model is built, the Trainer again at its load; under DDP, the processes
    # Lightning starts for the other ranks inherit what the first found.
    if checked in found_whole:
        return
    entry = "its central directory"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                entry = info.filename
                with archive.open(info) as stream:
                    while stream.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise ValueError(
            f"`ckpt_path` {str(ckpt_path)!r} is damaged: {entry} does not match what the Trainer wrote ({error}); "
            "nothing was loaded from it. HINT: copy the checkpoint again from where it was saved, or resume from an "
            "earlier checkpoint."
        ) from error
    os.environ[CHECKED_CHECKPOINTS_VARIABLE] = json.dumps([*found_whole, checked])


def _checked_checkpoints() -> list[list[Any]]:
    try:
        found_whole = json.loads(os.environ.get(CHECKED_CHECKPOINTS_VARIABLE, "[]"))
    except ValueError:  # set by hand to something else: check again
        return []
    return found_whole if isinstance(found_whole, list) else []


class WholeFileCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint beside its target and renames it over the target.

    Lightning's own write goes to a temporary file in the system's temporary folder, then moves it: where that folder
    is on another filesystem than the checkpoints (a local ``/tmp``, checkpoints on a network filesystem), the move is
    a copy into the final name, and a run killed during it leaves a cut checkpoint under that name, in place of the
    previous ``last.ckpt`` if that is the one being replaced. Written in the same folder and renamed, a checkpoint file
    is always whole: the previous one or the new one. Remote paths (``s3://`` ...) are left to Lightning.

    The temporary name, ``.ecoflap-checkpoint-*.partial``, holds no part of the checkpoint's name: a leftover of a run
    killed mid-write is never taken for ``last`` by ``ModelCheckpoint``, which matches names containing ``last``. Such
    leftovers are removed by the next checkpoint written to the same folder (their writer's lock is gone).

    A local checkpoint is checked whole (:func:`check_checkpoint_file`) before it is loaded, so that a resume from
    Python (``trainer.fit(..., ckpt_path=...)``) refuses a damaged file as the ``ecoflap`` command does.
    """

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if isinstance(get_filesystem(path), LocalFileSystem):
            check_checkpoint_file(path)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partial_files(target.parent, f"{_PARTIAL_PREFIX}*{_PARTIAL_SUFFIX}")
        with atomic_file(target, _PARTIAL_PREFIX, _PARTIAL_SUFFIX) as stream:
            _save_interruptibly(checkpoint, stream)


def _save_interruptibly(checkpoint: dict[str, Any], stream: Any) -> None:
    """``torch.save(checkpoint, stream)``, a stop during it (Ctrl+C's ``KeyboardInterrupt``, the ``SIGTERMException``
    the command raises for SIGTERM) raised as itself.

    torch's zip writer calls ``stream.write`` from C++; a stop raised in one of those calls leaves the writer
    mid-record, and closing it then raises ``RuntimeError("... unexpected pos ...")`` in its place. Neither Lightning
    nor the command takes that for a stop: the run ended with a traceback and status 1 instead of the stop's message
    and status (130, 143).
    """
    try:
        torch.save(checkpoint, stream)
    except RuntimeError as error:
        stop = error.__context__
        if isinstance(stop, (KeyboardInterrupt, SystemExit)):
            raise stop from None
        raise


def use_whole_file_checkpoints(strategy: Strategy) -> None:
    """Give ``strategy`` a :class:`WholeFileCheckpointIO` in place of Lightning's default ``TorchCheckpointIO``; the
    checkpoint IO of a strategy or plugin that brings its own is kept."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = WholeFileCheckpointIO()


def check_checkpoint_room(trainer: pl.Trainer, callback_tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a ``fit`` now if the local folder of one of its ``ModelCheckpoint`` callbacks has less free space than one
    checkpoint takes (:func:`least_checkpoint_bytes`).

    The first checkpoint is written after the first epoch (or ``every_n_train_steps``): without this, a full disk shows
    only then, after pruning and training. Call it once the folders are known (``ModelCheckpoint.setup`` resolves the
    default ``lightning_logs/version_N/checkpoints``), on every process: global rank 0, which writes the checkpoints,
    checks, and every process raises its verdict, so that all stop together.

    Args:
        trainer: the Trainer, its optimizers built.
        callback_tensors: the tensors a callback holds now, which go into the checkpoint with its state.

    Raises:
        OSError: a checkpoint folder's filesystem has less free space than the bound.
    """
    if trainer.max_steps == 0 or trainer.max_epochs == 0 or trainer.strategy.restore_checkpoint_after_setup:
        return  # no training step, no checkpoint; a sharding strategy writes each process's shard (not bounded here)
    refusal = None
    if trainer.is_global_zero:
        try:
            for callback in trainer.checkpoint_callbacks:
                if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
                    continue
                if not isinstance(get_filesystem(callback.dirpath), LocalFileSystem):
                    continue
                if callback.save_top_k == 0 and not callback.save_last:
                    continue  # it writes no checkpoint
                weights_only = callback.save_weights_only
                least = least_checkpoint_bytes(trainer, {} if weights_only else callback_tensors, weights_only)
                held = "" if weights_only else ", the callbacks' state and a resumed run's optimizer state"
                what = f"one checkpoint (a lower bound: the model's state dict{held})"
                folder = callback.dirpath
                check_free_space(folder, least, option="ModelCheckpoint.dirpath", target=folder, what=what)
        except OSError as error:
            refusal = str(error)
    refusal = trainer.strategy.broadcast(refusal, src=0)
    if refusal is not None:
        raise OSError(refusal)


def least_checkpoint_bytes(
    trainer: pl.Trainer, callback_tensors: Mapping[str, torch.Tensor], weights_only: bool = False
) -> int:
    """A lower bound of the size of one checkpoint of ``trainer``, known before its training starts.

    Counted: the LightningModule's state dict; unless ``weights_only``, ``callback_tensors`` and, when resuming, the
    optimizers' state of the checkpoint Lightning has loaded and restores into the optimizers after ``on_fit_start``
    (the loaded checkpoint itself, so the file is not read again, under the ``weights_only`` the user chose). The
    optimizers' state of a new run is left out: Adam's moments, for instance, are created at the first step only for
    the weights that get a gradient, which cannot be known before (a trainable weight that no loss reaches gets none).
    A first checkpoint with Adam takes about three times this bound.
    """
    tensors: dict[str, torch.Tensor] = dict(trainer.lightning_module.state_dict())
    if not weights_only:
        tensors.update({f"callback.{name}": tensor for name, tensor in callback_tensors.items()})
        # Lightning holds the checkpoint it resumes from until `restore_training_state`, which follows `on_fit_start`
        # (an internal attribute; without it the bound leaves the resumed optimizer state out, and stays a lower one).
        loaded = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None) or {}
        resumed = _tensors_in(loaded.get("optimizer_states", []))
        tensors.update({f"optimizer.{index}": tensor for index, tensor in enumerate(resumed)})
    return tensor_bytes(tensors)


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples (an optimizer's ``state_dict``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
