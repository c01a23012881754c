"""Child process of the interruption tests: ``ecoflap ARGS`` that sends itself a real signal at a chosen step.

Usage: ``python signal_at.py MODULE:NAME[.METHOD] SIGNAL CALL ARGS...``: the ``CALL``-th call of that function sends
``SIGNAL`` (e.g. ``SIGTERM``) to this process, then runs the function, so the signal lands in the middle of the work
around it (the folder write that calls it, the pruning that calls it). Logging is at INFO, as a user sees it.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Any

from ecoflap_pl.cli import main


def signal_at(where: str, signum: int, call: int) -> None:
    module_name, _, path = where.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            print(f"sending {signal.Signals(signum).name} at {where}", flush=True)
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    where, signame, call = sys.argv[1:4]
    signal_at(where, getattr(signal, signame), int(call))
    sys.argv = ["ecoflap", *sys.argv[4:]]
    main()
