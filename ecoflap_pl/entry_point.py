"""The ``ecoflap`` console script and ``python -m ecoflap_pl``: a module that imports nothing heavy.

Importing the command (torch, Lightning, transformers) takes seconds before :func:`ecoflap_pl.cli.main` can catch
anything, so a Ctrl+C in those seconds printed Python's traceback of the import. :func:`main` imports the command
itself, with a SIGINT handler of its own: a Ctrl+C at any moment ends the run with the same line and status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

log = logging.getLogger(__name__)

SIGINT_STATUS = 130
"""Exit status of a run stopped by SIGINT (Ctrl+C): 128 + the signal's number, as a shell reports it."""

_STOPPED = "Stopped by SIGINT (Ctrl+C)."


def stopped_by_sigint() -> NoReturn:
    """End the run stopped by SIGINT (Ctrl+C) with one line and :data:`SIGINT_STATUS`."""
    log.warning(_STOPPED)
    sys.exit(SIGINT_STATUS)


def main() -> None:
    """Run ``ecoflap`` on ``sys.argv`` (see :func:`ecoflap_pl.cli.main`), a Ctrl+C while it is imported included."""
    with _sigint_exits_at_once():
        from ecoflap_pl.cli import main as run_command  # seconds: torch, Lightning, transformers
    try:
        run_command()
    except KeyboardInterrupt:  # between the import and the command's own handler
        stopped_by_sigint()


@contextmanager
def _sigint_exits_at_once() -> Iterator[None]:
    """Make SIGINT end the process at once, with :data:`SIGINT_STATUS`, while the command is imported.

    A ``KeyboardInterrupt`` unwinding through half-done imports raises errors of its own (a half-initialised numpy
    answers the next lookup of one of its submodules with a ``RecursionError``) and makes ``python -m`` die by the
    signal when it crossed an ``exec`` of a dataclass's generated code. Nothing of the run has started yet, no file
    is open for writing, so there is nothing to unwind: the handler says so and exits. A SIGINT that Python does
    not turn into ``KeyboardInterrupt`` (ignored, as in a shell's background job) is left as it is.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        log.warning(_STOPPED)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(SIGINT_STATUS)

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
