"""Per-stage counters: forward passes, wall time and peak memory."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class StageStats:
    """What one stage of a pruning run cost.

    ``peak_memory_bytes`` is the peak of ``torch.cuda.max_memory_allocated`` on a CUDA device
    (``memory_kind="cuda_allocated"``), else the peak resident set size of the process sampled every 5 ms
    (``"cpu_rss"``). ``recorded_bytes`` is what the zeroth-order step keeps of one calibration batch's block outputs
    for prefix reuse, and ``probe_replicas`` the number of probes it ran per forward (0 where neither applies).
    ``samples`` is the number of calibration samples the coarse or fine step read, over all ranks: the leading
    batches that hold its ``*_samples`` (whole batches, so it may be more), or all of them when fewer were given;
    for ``auto``, the held-out batches after them, which hold its ``auto_holdout_samples`` or those left (0 for other
    stages, and in reports written before it was recorded).

    ``full_forwards`` counts the calls of the calibration loss (a forward of the model, some stopped early or run with
    block outputs answered from a record), ``block_forwards`` the blocks run on their own (replays). Under DDP
    (:func:`over_ranks`) the counts are summed over the ranks, and ``seconds``, ``peak_memory_bytes`` and
    ``recorded_bytes`` are the largest rank's: the ranks work side by side, each in a process of its own.
    """

    full_forwards: int = 0
    block_forwards: int = 0
    backward_passes: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = "cpu_rss"
    recorded_bytes: int = 0
    probe_replicas: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def over_ranks(
    stats: StageStats,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    rank: int,
    world_size: int,
    device: torch.device,
) -> StageStats:
    """One rank's ``stats`` made those of the whole run, on every rank: the counts summed over the ranks (each counted
    only its share of the batches), the time and memory the largest rank's. ``all_reduce`` sums a tensor over the
    ranks; each rank puts its time and memory in a slot of its own, so the sum gathers them all (``None``: one
    process, ``stats`` as they are)."""
    if all_reduce is None:
        return stats
    counts = [stats.full_forwards, stats.block_forwards, stats.backward_passes]
    gathered = torch.zeros(len(counts) + 3 * world_size, dtype=torch.float64, device=device)
    gathered[: len(counts)] = torch.tensor(counts, dtype=torch.float64)
    slot = len(counts) + 3 * rank
    gathered[slot : slot + 3] = torch.tensor(
        [stats.seconds, stats.peak_memory_bytes, stats.recorded_bytes], dtype=torch.float64
    )
    summed = all_reduce(gathered).cpu()
    per_rank = summed[len(counts) :].view(world_size, 3).amax(dim=0).tolist()
    forwards, blocks, backwards = (int(value) for value in summed[: len(counts)].tolist())
    return replace(
        stats,
        full_forwards=forwards,
        block_forwards=blocks,
        backward_passes=backwards,
        seconds=per_rank[0],
        peak_memory_bytes=int(per_rank[1]),
        recorded_bytes=int(per_rank[2]),
    )


def resident_bytes() -> int:
    """The process's resident set size in bytes (0 where ``/proc`` cannot tell it)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return 0


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free on ``device``: the CUDA allocator's view of the GPU, else the kernel's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StageMonitor:
    """Context manager that counts a stage's work and measures its time and peak memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.full_forwards = 0
        self.block_forwards = 0
        self.backward_passes = 0
        self.recorded_bytes = 0
        self.probe_replicas = 0
        self._peak_rss = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._start = 0.0
        self.stats = StageStats()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak_rss = max(self._peak_rss, resident_bytes())

    def __enter__(self) -> StageMonitor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak_rss = resident_bytes()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_allocated"
        else:
            self._stop.set()
            if self._sampler is not None:
                self._sampler.join()
            peak, kind = max(self._peak_rss, resident_bytes()), "cpu_rss"
        self.stats = StageStats(
            self.full_forwards,
            self.block_forwards,
            self.backward_passes,
            time.perf_counter() - self._start,
            peak,
            kind,
            self.recorded_bytes,
            self.probe_replicas,
        )
