"""CPU process groups for the multi-process tests (imported as ``tests.distributed``): a free port, a gloo group
that is always destroyed, and ranks spawned with a shared dict for their results."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now, below the kernel's range of ephemeral ports.

    A port the kernel hands out (``bind(("127.0.0.1", 0))``) is free only until the process group binds it: any
    outgoing connection meanwhile (another rank's, gloo's) may get it as its local port, and a rank's store client
    that connects before the master listens may, once in a few tens of thousands of tries, get the master port
    itself and connect to itself. No port is handed out below that range, so neither can happen there.
    """
    lowest_ephemeral = _lowest_ephemeral_port()
    below = range(max(1024, lowest_ephemeral - 10_000), lowest_ephemeral)
    for port in random.Random().sample(below, min(100, len(below))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            return port
    raise OSError(f"no free port among 100 tried in {below}")


def _lowest_ephemeral_port() -> int:
    """The start of Linux's ``ip_local_port_range`` (32768 by default, also where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextmanager
def gloo_group(rank: int, world_size: int, port: int, timeout: timedelta | None = None) -> Iterator[None]:
    """This process as ``rank`` of a gloo group on 127.0.0.1:``port``, one torch thread, destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(main: Callable[[int, int, int, dict[Any, Any]], None], world_size: int = 2) -> dict[Any, Any]:
    """Run ``main(rank, world_size, port, shared)`` in ``world_size`` spawned processes; return what they put in
    ``shared``."""
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(main, args=(world_size, free_port(), shared), nprocs=world_size, join=True)
        return dict(shared)
