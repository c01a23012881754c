"""The ``ecoflap`` console script and ``python -m ecoflap_pl``: a module that imports nothing heavy.

Importing the command (torch, Lightning, transformers) takes seconds before :func:`ecoflap_pl.cli.main` can catch
anything, so a Ctrl+C in those seconds printed Python's traceback of the import, and a SIGTERM (``torchrun`` stopping
the other ranks once one has failed, a scheduler's cancel) killed the process without a word. :func:`main` imports the
command itself, with handlers of its own: either signal at any moment ends the run with the same line and status.
``ecoflap --version`` alone needs none of it and answers without the import (:func:`installed_versions`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

SIGINT_STATUS = 130
"""Exit status of a run stopped by SIGINT (Ctrl+C): 128 + the signal's number, as a shell reports it."""

SIGTERM_STATUS = 143
"""Exit status of a run stopped by SIGTERM, likewise 128 + 15."""

_STOPPED = "Stopped by SIGINT (Ctrl+C)."
STOPPED_BY_SIGTERM = "Stopped by SIGTERM."


def stopped_by_sigint() -> NoReturn:
    """End the run stopped by SIGINT (Ctrl+C) with one line and :data:`SIGINT_STATUS`."""
    log.warning(_STOPPED)
    sys.exit(SIGINT_STATUS)


VERSIONED_PACKAGES = ("ecoflap-pl", "torch", "lightning", "transformers", "timm", "accelerate")
"""The packages ``ecoflap --version`` lists: this one and the libraries a bug report needs."""

_LAUNCHER_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Where a launcher tells a process its rank, in the order Lightning's ``rank_zero_only`` reads them."""


def installed_versions() -> str:
    """``NAME VERSION``, one line per package of :data:`VERSIONED_PACKAGES`, read from the installed distributions'
    metadata: nothing is imported, so the answer comes at once (the full command's import takes 5-10 s)."""
    return "".join(f"{name} {importlib.metadata.version(name)}\n" for name in VERSIONED_PACKAGES)


def main() -> None:
    """Run ``ecoflap`` on ``sys.argv`` (see :func:`ecoflap_pl.cli.main`), a Ctrl+C while it is imported included."""
    if sys.argv[1:] == ["--version"]:
        _print_versions_on_rank_zero()
        return
    try:
        with _signals_exit_at_once():
            from ecoflap_pl.cli import main as run_command  # seconds: torch, Lightning, transformers
        run_command()
    except KeyboardInterrupt:  # between the import and the command's own handler
        stopped_by_sigint()


def _print_versions_on_rank_zero() -> None:
    """``ecoflap --version`` before Lightning is imported: printed by the process whose launcher rank is 0 (or that has
    none), as the full command prints it (Lightning's ``rank_zero_only`` reads the same variables, written by hand
    here because importing Lightning is the cost this answer avoids)."""
    rank = next((os.environ[name] for name in _LAUNCHER_RANK_VARIABLES if name in os.environ), "0")
    if int(rank) == 0:
        sys.stdout.write(installed_versions())


@contextmanager
def _signals_exit_at_once() -> Iterator[None]:
    """Make SIGINT and SIGTERM end the process at once, with their line and status, while the command is imported.

    A ``KeyboardInterrupt`` unwinding through half-done imports raises errors of its own (a half-initialised numpy
    answers the next lookup of one of its submodules with a ``RecursionError``) and makes ``python -m`` die by the
    signal when it crossed an ``exec`` of a dataclass's generated code. Nothing of the run has started yet, no file
    is open for writing, so there is nothing to unwind: the handler says so and exits. A signal the user's shell or
    launcher set to be ignored (SIGINT in a background job, ``nohup``) is left as it is.

    SIGINT gets Python's handler back on exit (a ``KeyboardInterrupt`` then unwinds the run); the SIGTERM handler is
    left in place until the command sets its own, as its first step, and puts this one back when it ends: with the
    default restored in between, a SIGTERM at that moment killed the process without a word (status -15).
    """
    said = {signal.SIGINT: (_STOPPED, SIGINT_STATUS), signal.SIGTERM: (STOPPED_BY_SIGTERM, SIGTERM_STATUS)}
    python_defaults: dict[signal.Signals, Callable[[int, FrameType | None], Any] | signal.Handlers] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
    }

    def stop(signum: int, frame: FrameType | None) -> None:
        line, status = said[signal.Signals(signum)]
        log.warning(line)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    taken = [signum for signum, default in python_defaults.items() if signal.getsignal(signum) is default]
    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        if signal.SIGINT in taken:
            signal.signal(signal.SIGINT, signal.default_int_handler)
