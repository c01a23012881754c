"""Lightning checkpoint files: written whole (never a cut file under the checkpoint's name), and checked whole before
any of it is loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from ecoflap_pl.export.atomic import atomic_file, remove_stale_partial_files

_CHUNK = 1 << 24
# The name of a checkpoint being written holds no part of its final name (see WholeFileCheckpointIO).
_PARTIAL_PREFIX, _PARTIAL_SUFFIX = ".ecoflap-checkpoint-", ".partial"
_CHECKED: set[tuple[str, int, int]] = set()  # (file, size, modification time) of the checkpoints found whole


def check_checkpoint_file(ckpt_path: str | Path) -> None:
    """Refuse a checkpoint whose bytes changed after the Trainer wrote it (a bad disk, a damaged copy).

    ``torch.load`` does not check the CRC-32 that ``torch.save`` records for each entry of the archive, so a changed
    byte inside a tensor loads silently as a wrong weight. :mod:`zipfile` checks it while reading an entry, so every
    entry is read through once here. Entries saved without a checksum (``compute_crc32`` off in
    ``torch.serialization.config``, recorded as 0) cannot be checked and are skipped. A file that is no zip archive at
    all is left to ``torch.load``, whose refusal names the problem.

    Raises:
        ValueError: an entry does not match its checksum, or the archive's directory is damaged.
    """
    path = Path(ckpt_path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    stat = path.stat()
    checked = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if checked in _CHECKED:  # the `ecoflap` command checks before the model is built, the Trainer again at its load
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
    _CHECKED.add(checked)


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
            torch.save(checkpoint, stream)
