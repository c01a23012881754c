"""What checking a checkpoint whole costs next to loading it, cold-ish and warm, by one process and by two at once.

Before a local checkpoint is loaded, :func:`~ecoflap_pl.callbacks.checkpoint_file.check_checkpoint_file` reads every
entry of its zip archive once so that :mod:`zipfile` checks its CRC-32. Under DDP every process loads the checkpoint
and every process checks it. This writes a checkpoint of realistic size (``--gib``; tensors of 16 MiB, as the
weights of a 1 B-parameter model are saved by ``torch.save``), then times, on the same file:

* cold-ish: the file's pages dropped from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``), then the
  check; dropped again, then ``torch.load`` as Lightning calls it (``map_location="cpu"``, ``weights_only=False``);
* warm: the check, then ``torch.load``, from the page cache (the check's own read leaves the file there);
* two processes checking the same warm file at once, as two DDP ranks of one node do.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/checkpoint_check.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from _results import GIB, publish_section

from ecoflap_pl.callbacks import checkpoint_file

SECTION = "## Checking a checkpoint whole before it is loaded"
_TENSOR = 1 << 22  # 4 Mi float32 values: 16 MiB per tensor


def write_checkpoint(path: Path, gib: float) -> int:
    count = max(1, round(gib * GIB / (4 * _TENSOR)))
    generator = torch.Generator().manual_seed(0)
    state = {f"layer{index}.weight": torch.randn(_TENSOR, generator=generator) for index in range(count)}
    torch.save({"state_dict": state, "global_step": 0}, path)
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())
    return path.stat().st_size


def drop_from_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def timed_check(path: Path) -> float:
    checkpoint_file._CHECKED.clear()  # each timing reads the file; the cache would skip the second
    started = time.perf_counter()
    checkpoint_file.check_checkpoint_file(path)
    return time.perf_counter() - started


def timed_load(path: Path) -> float:
    started = time.perf_counter()
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    seconds = time.perf_counter() - started
    del loaded
    return seconds


def _check_in_child(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(timed_check(Path(path)))


def two_at_once(path: Path) -> tuple[float, float]:
    """Wall time of two processes checking ``path`` together, and the slower one's own time."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_check_in_child, args=(str(path), queue)) for _ in range(2)]
    started = time.perf_counter()
    for child in children:
        child.start()
    own = [queue.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    return time.perf_counter() - started, max(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.5, help="size of the checkpoint written")
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where it is written (removed at the end)")
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(dir=args.folder)) / "large.ckpt"
    try:
        size = write_checkpoint(path, args.gib)
        drop_from_page_cache(path)
        cold_check = timed_check(path)
        drop_from_page_cache(path)
        cold_load = timed_load(path)
        warm_check = min(timed_check(path) for _ in range(2))
        warm_load = min(timed_load(path) for _ in range(2))
        both_wall, both_own = two_at_once(path)
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    print(
        f"{size / GIB:.2f} GiB: cold check {cold_check:.2f} s, load {cold_load:.2f} s; warm check {warm_check:.2f} s, "
        f"load {warm_load:.2f} s; two checks at once {both_wall:.2f} s wall ({both_own:.2f} s the slower)"
    )
    rows = [
        ("cold-ish (dropped from the page cache)", cold_check, cold_load),
        ("warm (in the page cache)", warm_check, warm_load),
    ]
    lines = [
        SECTION,
        "",
        f"`OMP_NUM_THREADS={torch.get_num_threads()} nice -n 10 python benchmarks/checkpoint_check.py --gib {args.gib}` "
        f"(a {size / GIB:.2f} GiB checkpoint of 16 MiB float32 tensors written to {args.folder}; warm figures: the "
        f"best of 2). Machine: {platform.machine()} CPU, {os.cpu_count()} cores, local disk, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after the run (shared with other jobs); torch "
        f"{torch.__version__}.",
        "",
        "| page cache | check whole (CRC-32 of every entry) | `torch.load` | check / load |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {check:.2f} s | {load:.2f} s | {check / load:.2f} |" for name, check, load in rows]
    lines += [
        "",
        f"Two processes checking the same warm file at once (two DDP ranks of one node): {both_wall:.2f} s wall, "
        f"{both_own:.2f} s for the slower check, against {warm_check:.2f} s for one alone.",
        "",
    ]
    publish_section("\n".join(lines), SECTION, args.write)


if __name__ == "__main__":
    main()
