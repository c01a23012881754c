"""Give the files a write creates the modes a plain ``open()`` / ``mkdir()`` would give them (the umask's).

Some writers create their files private whatever the umask says: ``safetensors`` >= 0.8 writes every
``*.safetensors`` (``save_file``, ``save_model``, and so ``save_pretrained`` and ``huggingface_hub``'s
``save_torch_state_dict``) into a temporary file made with mode 0600 and renames it into place. A pruned model folder
would then be readable by its owner only, while ``config.json`` beside it follows the umask (0644 under the usual
umask 022). :func:`umask_modes` puts every new entry back on the umask's modes.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def umask_modes(folder: str | Path) -> Iterator[None]:
    """Give the files and folders that the block creates under the existing ``folder`` the modes a plain ``open()``
    (files) or ``mkdir()`` (folders) would have given them.

    A new entry gets the mode of a new file or folder there; a file replaced by another one (a new file renamed over
    it) gets back the mode of the one it replaced, as when ``open()`` rewrites a file; entries left alone keep theirs.
    The modes of new entries are read from a probe file and folder created in ``folder`` rather than computed from the
    umask: reading the umask means setting it (``os.umask``), which would change it for every thread of the process
    for a moment, and the probe also follows what the filesystem adds (a default ACL, a set-group-ID folder). Symbolic
    links are left alone. A mode that cannot be set (a filesystem without modes) is logged, never raised: the files
    are complete.
    """
    folder = Path(folder)
    before = _entries(folder)
    yield
    changed = {path: entry for path, entry in _entries(folder).items() if before.get(path, (None, 0))[0] != entry[0]}
    if not changed:
        return
    file_mode, folder_mode = _default_modes(folder)
    for path, (_, st_mode) in changed.items():
        replaced = before.get(path, (None, 0))[1]
        if stat.S_IFMT(replaced) == stat.S_IFMT(st_mode):
            mode = stat.S_IMODE(replaced)
        else:
            mode = folder_mode if stat.S_ISDIR(st_mode) else file_mode
        try:
            os.chmod(path, mode)
        except OSError as error:
            logger.warning("Could not set the mode of %s: %s", path, error)


def _entries(folder: Path) -> dict[str, tuple[tuple[int, int], int]]:
    """Every file and folder under ``folder`` (symbolic links left out): ``{path: ((device, inode), st_mode)}``."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in (*folders, *files):
            path = os.path.join(root, name)
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode):
                found[path] = ((info.st_dev, info.st_ino), info.st_mode)
    return found


def _default_modes(folder: Path) -> tuple[int, int]:
    """The permission bits of a new file and of a new folder in ``folder``."""
    probe = folder / f".ecoflap-mode-probe-{secrets.token_hex(6)}"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        file_mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        os.unlink(probe)
    os.mkdir(probe, 0o777)
    try:
        folder_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    return file_mode, folder_mode
