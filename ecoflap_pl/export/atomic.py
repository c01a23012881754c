"""Replace a directory all at once: write beside it, then swap, so a reader never sees a mix of old and new.

A write goes into ``.<name>.partial-<pid>-<random>`` in the target's parent (same filesystem, so renames are atomic).
Once every file is written and flushed to disk, the folder takes the target's place: on Linux with one
``renameat2(RENAME_EXCHANGE)`` call (the old and the new folder trade names in one step), elsewhere with two renames
(old aside as ``.<name>.previous-<pid>-<random>``, new in place). A process killed at any moment leaves either the old
folder or the complete new one at the target path; its leftovers are removed by the next write to the same target.

Which leftovers are stale is decided by a lock, not by a process id. Each write holds an exclusive advisory lock
(``flock``) on its own lock file, ``.<name>.writer-<pid>-<random>``, from before its partial folder exists until after
it is gone; the kernel drops the lock when the writer exits, however it ends (SIGKILL too). Leftovers whose lock can be
taken are stale; those whose lock is held belong to a live write and are left alone. A process id alone cannot tell:
after a crash the id is given to another, unrelated process (the leftover would be kept forever), and a writer on
another machine or in another container sharing the folder has an id that means nothing here (its live write would
be removed). Recording the process start time beside the id fixes the first, not the second, and needs ``/proc`` or
a platform-specific call. The lock is a regular file opened for writing, not the folder itself, because NFS clients
emulate ``flock`` with byte-range locks, which need a file open for writing. Where no lock can be taken (Windows, which
has no ``flock``; a filesystem mounted without lock support), a leftover whose lock file is still there cannot be
judged: it is kept and a warning names it, to be removed by hand when no write to that folder runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ecoflap_pl.export.file_modes import umask_modes

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

_PARTIAL = "partial"
_PREVIOUS = "previous"
_WRITER = "writer"
_RENAME_EXCHANGE = 2  # linux/fs.h


def check_save_target(
    target: str | Path,
    *,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    run_folders: Iterable[str | Path] = (),
    option: str = "save_to",
    least_bytes: int = 0,
) -> Path:
    """Check, before any long work, that :func:`atomic_directory` can write ``target``.

    Args:
        target: the directory to (re)place.
        overwrite: whether an existing non-empty ``target`` may be replaced.
        protected: directories the write must never replace, nor any folder holding them (e.g. the ``pretrained``
            model's weights).
        run_folders: directories the run writes its own files into (logs, checkpoints, its saved config), which the
            write must not replace either, nor any folder holding them: the whole ``target`` is swapped out.
        option: the user-facing name of ``target`` in messages.
        least_bytes: a lower bound of what the write will take; refused when the filesystem that receives it has
            less free space. The new folder is complete before an old ``target`` goes, so its space does not count.

    Returns:
        ``target`` as an absolute path (where it points, when it is a symbolic link: see :func:`atomic_directory`).

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty directory and ``overwrite`` is false.
        ValueError: ``target`` is, or holds, a protected directory or a run folder; or it is a mount point.
        PermissionError: the folder that would receive ``target`` cannot be written.
        OSError: less free space than ``least_bytes`` where ``target`` would be written.
    """
    path = _followed(Path(target).expanduser().absolute())
    resolved = path.resolve()
    source_path = _first_held(resolved, protected)
    if source_path is not None:
        raise ValueError(
            f"`{option}` is {str(target)!r}, which holds the source model ({source_path}): writing there would "
            f"replace the weights being pruned. HINT: choose another folder, e.g. '{option}: {path.name}-pruned'."
        )
    run_folder = _first_held(resolved, run_folders)
    if run_folder is not None:
        raise ValueError(
            f"`{option}` is {str(target)!r}, which holds the run's own folder {run_folder} (its logs, checkpoints "
            "and saved config): the model's folder is replaced whole when it is written, so they would be deleted. "
            f"HINT: choose a folder of its own, e.g. '{option}: {Path(target) / 'pruned'}'."
        )
    _refuse_a_file(path, option, target)
    if os.path.ismount(path):
        raise ValueError(
            f"`{option}` is {str(target)!r}, a mount point: the new folder is written beside it and then takes its "
            f"place, which a mount point does not allow (Device or resource busy). HINT: save into a folder inside "
            f"it, e.g. '{option}: {path / 'pruned'}'."
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`{option}` is {str(target)!r}, a folder that is not empty; nothing was written. HINT: choose an empty or "
            f"new folder, or replace it with --pruning.overwrite true (the old folder is swapped out only once the new "
            "one is complete)."
        )
    # The new folder is written beside the target, so it is its parent that must take new entries.
    check_writable_folder(path.parent, option=option, target=target)
    check_free_space(path.parent, least_bytes, option=option, target=target)
    return path


def check_free_space(
    folder: str | Path, least_bytes: int, *, option: str, target: str | Path, what: str = "the model"
) -> None:
    """Check, before any long work, that the filesystem receiving ``folder`` (created later when missing) has at least
    ``least_bytes`` free.

    Args:
        folder: the folder that will receive the files.
        least_bytes: a lower bound of what will be written there.
        option: the user-facing name of the setting in messages.
        target: the path the user gave, quoted in messages.
        what: what is written, as the message names it.

    Raises:
        OSError: less free space than ``least_bytes``.
    """
    ancestor = _existing_ancestor(Path(folder).expanduser().absolute(), option, target)
    free = shutil.disk_usage(ancestor).free
    if least_bytes > free:
        raise OSError(
            f"`{option}` is {str(target)!r}: {what} takes at least {_size(least_bytes)} there, and the filesystem of "
            f"{ancestor} has {_size(free)} free; nothing was written. HINT: free space there, or choose a folder on "
            "another disk.",
        )


def _size(count: int) -> str:
    """``count`` bytes in GiB, or in MiB or KiB below one of the unit, so that the figure is never 0.00."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 2**power:
            return f"{count / 2**power:.2f} {unit}"
    return f"{count} bytes"


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


def _first_held(resolved: Path, folders: Iterable[str | Path]) -> Path | None:
    """The first of ``folders`` that the resolved path ``resolved`` is, or holds; ``None`` when none."""
    for folder in folders:
        folder_path = Path(folder).expanduser().resolve()
        if resolved == folder_path or resolved in folder_path.parents:
            return folder_path
    return None


def _followed(path: Path) -> Path:
    """The path a symbolic link ``path`` points to, else ``path``: a target that is a link to a folder (on a larger
    disk, say) is written where it points and the link is kept; swapping a new folder into the link's own place would
    replace the link, and the old folder would stay where the link pointed."""
    return path.resolve() if path.is_symlink() else path


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

    Every file and folder written into it gets the mode a plain ``open()`` / ``mkdir()`` gives (the umask's), whatever
    mode its writer gave it (:func:`~ecoflap_pl.export.file_modes.umask_modes`). A ``target`` that is a symbolic link
    is kept: the folder it points to is replaced, and the new one is written beside that folder. Checks belong to
    :func:`check_save_target`, called before the work that produces the files.
    """
    target = _followed(Path(target).expanduser().absolute())
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(target)
    with _writer_lock(target) as tag:
        partial = _leftover(target, _PARTIAL, tag)
        partial.mkdir()
        try:
            with umask_modes(partial):
                yield partial
            _sync_tree(partial)
            _swap_into_place(partial, target, _leftover(target, _PREVIOUS, tag))
        finally:
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def atomic_file(target: Path, partial_prefix: str, partial_suffix: str) -> Iterator[BinaryIO]:
    """Yield a new file beside ``target``, open for binary writing; on a clean exit it is flushed to disk and renamed
    over ``target``, on an error it is removed. A process killed at any moment leaves the old ``target`` or the new one.

    The file is named ``<partial_prefix><random><partial_suffix>`` and holds an exclusive lock (``flock``) until it has
    its final name, so that :func:`remove_stale_partial_files` removes it only once its writer is gone. It is created
    with the modes a plain ``open()`` gives (the umask's), which the renamed file keeps.
    """
    _, partial, descriptor = _create_locked(
        lambda tag: target.parent / f"{partial_prefix}{tag}{partial_suffix}", os.O_WRONLY
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            if sys.platform != "win32":  # renamed while still locked, so that no cleaner removes the finished file
                os.replace(partial, target)
        if sys.platform == "win32":  # Windows renames no open file (and has no flock, so no cleaner runs)
            os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def remove_stale_partial_files(folder: Path, pattern: str) -> None:
    """Remove the files of ``folder`` matching ``pattern`` that :func:`atomic_file` left when its writer was killed:
    those whose lock can be taken. Files of writes that still run are left alone, and so is everything where no lock
    can be taken (Windows, a filesystem without locks)."""
    for leftover in folder.glob(pattern):
        with _stale_writer(leftover) as stale:
            if stale:
                logger.info("Removing %s, left by an interrupted write", leftover)
                leftover.unlink(missing_ok=True)


def _leftover(target: Path, kind: str, tag: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{tag}"


@contextmanager
def _writer_lock(target: Path) -> Iterator[str]:
    """Create a lock file for a new write of ``target`` and hold an exclusive lock on it for the block; yield the tag
    that names the write's partial folder. The lock file is removed at the end.

    A filesystem that refuses locks leaves the write unlocked (:func:`_create_locked`): :func:`_remove_stale_leftovers`
    cannot take a lock there either, so it keeps its leftovers.
    """
    tag, path, descriptor = _create_locked(lambda tag: _leftover(target, _WRITER, tag), os.O_RDWR)
    try:
        yield tag
    finally:
        os.close(descriptor)  # closing releases the lock; Windows cannot remove a file that is still open
        path.unlink(missing_ok=True)


def _create_locked(name: Callable[[str], Path], access: int) -> tuple[str, Path, int]:
    """Create a new file named ``name(tag)`` for a fresh tag, open with ``access``, and take an exclusive lock on it;
    return the tag, the path and the descriptor.

    A cleaner may take the new file for a dead write's in the moment between its creation and its lock, and remove it;
    the file is then made again under a new tag. A filesystem that refuses locks is logged at DEBUG level and the file
    is returned unlocked (no cleaner can take a lock there either).
    """
    while True:
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        path = name(tag)
        descriptor = os.open(path, access | os.O_CREAT | os.O_EXCL, 0o666)
        locked = _take_lock(descriptor)
        if locked is None:
            logger.debug("No file lock on %s; what this write leaves behind, if anything, will be kept", path)
        if locked is not False and _names(path, descriptor):
            return tag, path, descriptor
        os.close(descriptor)


def _names(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(descriptor))
    except FileNotFoundError:
        return False


def _remove_stale_leftovers(target: Path) -> None:
    """Clean up after writers of ``target`` that no longer run (killed mid-write).

    A partial folder is removed; the old folder set aside by the two-rename fallback goes back in place if the
    kill came between its two renames, else it is removed. Leftovers of a write that still holds its lock are kept.
    Names without a lock file (a write whose lock file is gone, or one by a version that took no lock) are stale.
    """
    prefix = f".{target.name}."
    leftovers: dict[str, list[str]] = {}
    for leftover in target.parent.iterdir():
        kind, dash, tag = leftover.name[len(prefix) :].partition("-")
        if leftover.name.startswith(prefix) and kind in (_PARTIAL, _PREVIOUS, _WRITER) and dash and tag:
            leftovers.setdefault(tag, []).append(leftover.name)
    for tag, names in sorted(leftovers.items()):
        with _stale_writer(_leftover(target, _WRITER, tag)) as stale:
            if stale is None:
                logger.warning(
                    "Keeping %s in %s: this system cannot tell whether the write that left them still runs (no file "
                    "locks here). HINT: remove them once no run is writing %s.",
                    ", ".join(sorted(names)),
                    target.parent,
                    target,
                )
            elif stale:
                _remove_leftovers_of(target, tag)


@contextmanager
def _stale_writer(lock_path: Path) -> Iterator[bool | None]:
    """Whether the write that owns ``lock_path`` has ended (``None``: cannot tell); if so its lock is held for the
    block, so that no other cleaner works on the same leftovers."""
    descriptor = None
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        stale: bool | None = True
    except OSError:  # e.g. another user's lock file
        stale = None
    else:
        stale = _take_lock(descriptor)
    try:
        yield stale
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _take_lock(descriptor: int) -> bool | None:
    """``True``: the exclusive lock is now held; ``False``: another open file holds it; ``None``: no lock possible."""
    if sys.platform == "win32":
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _remove_leftovers_of(target: Path, tag: str) -> None:
    previous, partial = _leftover(target, _PREVIOUS, tag), _leftover(target, _PARTIAL, tag)
    if previous.is_dir() and not target.exists():
        logger.warning("Restoring %s from %s, set aside by an interrupted write", target, previous)
        os.rename(previous, target)
    for folder in (previous, partial):
        if folder.is_dir():
            logger.info("Removing %s, left by an interrupted write", folder)
            shutil.rmtree(folder, ignore_errors=True)
    _leftover(target, _WRITER, tag).unlink(missing_ok=True)


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


def _swap_into_place(partial: Path, target: Path, aside: Path) -> None:
    if not target.exists():
        os.rename(partial, target)
    elif not _exchange(partial, target):
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
