"""Gathering values from every rank for the tasks' whole-split evaluation (retrieval, VQA results files).

Outside an initialised process group each helper returns this process's value alone, so the tasks call them
unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

T = TypeVar("T")


def distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def gather_tensors(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order; the first dimension may differ between ranks (torchmetrics pads and
    trims it)."""
    return gather_all_tensors(tensor) if distributed() else [tensor]


def gather_objects(value: T) -> list[T]:
    """Every rank's picklable ``value``, in rank order."""
    if not distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank."""
    return any(gather_objects(flag))


def pad_cat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``(n_i, L_i)`` token tensors along rows, right-padding with 0 to the longest ``L``."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, length - t.shape[1])) for t in tensors])
