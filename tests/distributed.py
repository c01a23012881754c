"""CPU process groups for the multi-process tests (imported as ``tests.distributed``): a free port, a gloo group
that is always destroyed, and ranks spawned with a shared dict for their results."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
