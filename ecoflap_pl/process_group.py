"""Destroying a gloo process group before its process exits.

Lightning destroys the default process group at exit only under NCCL. A gloo group left to the interpreter's own
teardown makes torch 2.14 abort about one exit in five ("terminate called without an active exception", SIGABRT),
after the run has finished: the spawn launcher then reports the whole run as failed. Destroying the group from an
``atexit`` hook, as Lightning does for NCCL, ends the process cleanly.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_gloo_group_at_exit() -> None:
    """Have this process destroy its default gloo process group when it exits; once, however often it is called.

    Without an initialised gloo group (one process, or NCCL, which Lightning already destroys) it does nothing.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == dist.Backend.GLOO:
        atexit.unregister(_destroy_process_group)  # registered once, however many stages set the callback up
        atexit.register(_destroy_process_group)
