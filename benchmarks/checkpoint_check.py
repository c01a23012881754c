"""What checking a checkpoint whole costs next to loading it, cold-ish and warm, by one process and by two at once.

Before a local checkpoint is loaded, :func:`~ecoflap_pl.callbacks.checkpoint_file.check_checkpoint_file` reads every
entry of its zip archive once so that :mod:`zipfile` checks its CRC-32. Under DDP every process loads the checkpoint
and every process checks it. This writes a checkpoint of realistic size (``--gib``; tensors of 16 MiB, as the
weights of a 1 B-parameter model are saved by ``torch.save``), then times, on the same file:

* cold-ish: the file's pages dropped from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``), then the
  check; dropped again, then ``torch.load`` as Lightning calls it (``map_location="cpu"``, ``weights_only=False``);
* warm: the check, then ``torch.load``, from the page cache (the check's own read leaves the file there);
* two processes checking the same warm file at once, as two DDP ranks of one node started together do;
* a process that inherited the verdict (the processes Lightning starts for the other ranks of a node).

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
from typing import Any

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
    os.environ.pop(checkpoint_file.CHECKED_CHECKPOINTS_VARIABLE, None)  # each timing reads the file
    started = time.perf_counter()
    checkpoint_file.check_checkpoint_file(path)
    return time.perf_counter() - started


def timed_load(path: Path) -> float:
    started = time.perf_counter()
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    seconds = time.perf_counter() - started
    del loaded
    return seconds


def _check_in_child(path: str, ready: Any, queue: Any) -> None:
    ready.wait()  # both processes have imported torch: the checks start together
    queue.put(timed_check(Path(path)))


def two_at_once(path: Path) -> float:
    """The time of the slower of two processes checking ``path`` at the same moment."""
    context = multiprocessing.get_context("spawn")
    ready, queue = context.Barrier(2), context.Queue()
    children = [context.Process(target=_check_in_child, args=(str(path), ready, queue)) for _ in range(2)]
    for child in children:
        child.start()
    seconds = [queue.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    return max(seconds)


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
        both = two_at_once(path)
        checkpoint_file.check_checkpoint_file(path)
        started = time.perf_counter()
        checkpoint_file.check_checkpoint_file(path)  # as a process that inherited the verdict: no read
        inherited = time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    print(
        f"{size / GIB:.2f} GiB: cold check {cold_check:.2f} s, load {cold_load:.2f} s; warm check {warm_check:.2f} s, "
        f"load {warm_load:.2f} s; two checks at once {both:.2f} s; verdict inherited {1000 * inherited:.2f} ms"
    )
    rows = [
        ("cold-ish (dropped from the page cache)", cold_check, cold_load),
        ("warm (in the page cache)", warm_check, warm_load),
    ]
    lines = [
        SECTION,
        "",
        f"`OMP_NUM_THREADS={torch.get_num_threads()} nice -n 10 python benchmarks/checkpoint_check.py --gib {args.gib}"
        "` "
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
        f"Two processes checking the same warm file at once (two DDP ranks of one node, each on its own core): "
        f"{both:.2f} s for the slower, against {warm_check:.2f} s for one alone. A process that inherits the verdict "
        f"of the one that checked (`ECOFLAP_CHECKED_CHECKPOINTS`) reads nothing: {1000 * inherited:.2f} ms.",
        "",
        "Reading: the check costs about as much as the load it guards, so a file is checked once per node: the "
        "`ecoflap` command checks it before Lightning starts the processes of the other ranks, and they inherit the "
        "verdict. Ranks started together by an external launcher (`torchrun`, `srun`) each check it, in parallel: "
        "one of them checking while the others wait would still take one check's time, so sharing its verdict would "
        "save at most the difference between the two figures above, for a collective before every load.",
        "",
    ]
    publish_section("\n".join(lines), SECTION, args.write)


if __name__ == "__main__":
    main()
