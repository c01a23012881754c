"""Replace a directory all at once: write beside it, then swap, so a reader never sees a mix of old and new.

A write goes into ``.<name>.partial-<pid>`` in the target's parent (same filesystem, so renames are atomic). Once
every file is written and flushed to disk, the folder takes the target's place: on Linux with one
``renameat2(RENAME_EXCHANGE)`` call (the old and the new folder trade names in one step), elsewhere with two renames
(old aside, new in place). A process killed at any moment leaves either the old folder or the complete new one at the
target path; its leftover partial folder is removed by the next write to the same target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_PARTIAL = ".partial-"
_PREVIOUS = ".previous-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def check_save_target(
    target: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = (), option: str = "save_to"
) -> Path:
    """Check, before any long work, that :func:`atomic_directory` can write ``target``.

    Args:
        target: the directory to (re)place.
        overwrite: whether an existing non-empty ``target`` may be replaced.
        protected: directories the write must never replace, nor any folder holding them (e.g. the ``pretrained``
            model's weights).
        option: the user-facing name of ``target`` in messages.

    Returns:
        ``target`` as an absolute path.

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty directory and ``overwrite`` is false.
        ValueError: ``target`` is, or holds, a protected directory.
        PermissionError: the folder that would receive ``target`` cannot be written.
    """
    path = Path(target).expanduser().absolute()
    resolved = path.resolve()
    for source in protected:
        source_path = Path(source).expanduser().resolve()
        if resolved == source_path or resolved in source_path.parents:
            raise ValueError(
                f"`{option}` is {str(target)!r}, which holds the source model ({source_path}): writing there would "
                f"replace the weights being pruned. HINT: choose another folder, e.g. '{option}: {path.name}-pruned'."
            )
    _refuse_a_file(path, option, target)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`{option}` is {str(target)!r}, a folder that is not empty; nothing was written. HINT: choose an empty or "
            f"new folder, or replace it with --pruning.overwrite true (the old folder is swapped out only once the new "
            "one is complete)."
        )
    # The new folder is written beside the target, so it is its parent that must take new entries.
    check_writable_folder(path.parent, option=option, target=target)
    return path


def check_writable_folder(folder: str | Path, *, option: str, target: str | Path | None = None) -> Path:
    """Check, before any long work, that files can be written in ``folder`` (created later when missing).

    The nearest existing folder at or above ``folder`` is tried by creating and removing an empty subfolder in it:
    mode bits alone do not tell (root ignores them; ``/proc``, read-only mounts and full quotas refuse anyway).

    Args:
        folder: the folder that will receive files.
        option: the user-facing name of the setting in messages.
        target: the path the user gave, quoted in messages, when ``folder`` is the one that receives it (its
            parent); default: ``folder`` itself, which must then not be a file.

    Returns:
        ``folder`` as an absolute path.

    Raises:
        FileExistsError: ``folder`` or one of its parents is a file.
        PermissionError: the nearest existing folder cannot take new entries.
    """
    path = Path(folder).expanduser().absolute()
    if target is None:
        _refuse_a_file(path, option, folder)
    shown = folder if target is None else target
    ancestor = _existing_ancestor(path, option, shown)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ecoflap-write-check-", dir=ancestor))
    except OSError as error:
        raise PermissionError(
            f"`{option}` is {str(shown)!r}, but {ancestor} cannot be written ({error.strerror or error}). HINT: "
            "choose a folder you can write to."
        ) from error
    return path


def _refuse_a_file(path: Path, option: str, given: str | Path) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"`{option}` must be a directory, but {str(given)!r} is a file. HINT: choose a folder path (it is created "
            "if missing)."
        )


def _existing_ancestor(path: Path, option: str, target: str | Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise FileExistsError(
                    f"`{option}` is {str(target)!r}, but {candidate} is a file, so no folder can be made below it. "
                    "HINT: choose a path whose parents are folders."
                )
            return candidate
    raise FileNotFoundError(f"`{option}` is {str(target)!r}, which has no existing parent folder.")  # pragma: no cover


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on a clean exit it replaces ``target`` whole, on an error it is removed.

    Checks belong to :func:`check_save_target`, called before the work that produces the files.
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        _sync_tree(partial)
        _swap_into_place(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_stale_partials(target: Path) -> None:
    """Clean up after writers of ``target`` that no longer run (killed mid-write).

    A partial folder is removed; the old folder set aside by the two-rename fallback goes back in place if the
    kill came between its two renames, else it is removed.
    """
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = leftover.name[len(target.name) + 2 :].rpartition("-")
        if not pid.isdigit() or _is_running(int(pid)):
            continue
        if f".{kind}-" == _PREVIOUS and not target.exists():
            logger.warning("Restoring %s from %s, set aside by an interrupted write", target, leftover)
            os.rename(leftover, target)
        elif f".{kind}-" in (_PARTIAL, _PREVIOUS):
            logger.info("Removing %s, left by an interrupted write", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts a new write; an older partial of the same pid is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_tree(folder: Path) -> None:
    """Flush every file, then the folder itself, so a crash after the swap cannot expose empty files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
        descriptor = os.open(path, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows cannot open folders
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _swap_into_place(partial: Path, target: Path) -> None:
    if not target.exists():
        os.rename(partial, target)
    elif not _exchange(partial, target):
        aside = target.parent / f".{target.name}{_PREVIOUS}{os.getpid()}"
        os.rename(target, aside)
        os.rename(partial, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        shutil.rmtree(partial)  # now the old folder
    _fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap the names of two paths in one atomic step (Linux ``renameat2``); ``False`` where unsupported.

    Python's ``os`` module exposes no atomic exchange, hence the direct libc call.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    if result != 0:
        error = ctypes.get_errno()
        logger.debug("renameat2(RENAME_EXCHANGE) failed: %s", os.strerror(error))
        return False
    return True
