"""A Lightning checkpoint file checked whole before any of it is loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path

_CHUNK = 1 << 24


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
