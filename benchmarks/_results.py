"""What the benchmarks share: printing and writing one section of ``benchmarks/RESULTS.md`` without touching the
others, saving raw numbers, printing progress, formatting counts and sizes, building seeded random models, and
validating a task on the CPU."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

GIB = 1024**3


def write_section(path: str, heading: str, section: str) -> None:
    """Replace the section of ``path`` that starts with ``heading`` (or append it), leaving every other one alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as handle:
        handle.write(text.rstrip("\n") + "\n")


def publish_section(section: str, heading: str, path: str | None) -> None:
    """Print ``section``; with a ``path`` (a script's ``--write``), also put it in that file (:func:`write_section`)."""
    print(section)
    if path:
        write_section(path, heading, section)


def dump_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so that an interrupted run never leaves half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(temporary, path)


def progress_printer(started: float) -> Callable[[str, int, int], None]:
    """``prune``'s progress callback: about 20 lines per stage on stderr, with elapsed time and an estimate."""
    state: dict[str, Any] = {"stage": None, "since": started, "last": started}

    def report(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != state["stage"]:
            state["stage"], state["since"] = stage, state["last"]
        state["last"] = now
        if done == total or done % max(1, total // 20) == 0:
            elapsed = now - state["since"]
            left = elapsed / done * (total - done)
            print(
                f"  [{stage}] {done}/{total}  {elapsed:.1f} s elapsed, ~{left:.0f} s left", file=sys.stderr, flush=True
            )

    return report


def format_count(number: float) -> str:
    """A parameter count in billions or millions."""
    return f"{number / 1e9:.3f} B" if number >= 1e9 else f"{number / 1e6:.2f} M"


def format_size(size: float) -> str:
    """A byte count in GiB, or MiB below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 1024**2:.0f} MiB"


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, at_least_one: Iterable[str]) -> None:
    """The checks the full-size benchmarks share: ``--sparsity`` in [0, 1) and each option of ``at_least_one`` (by
    attribute name) at least 1, through ``parser.error``; ``args.threads`` defaults to one torch thread on the CPU."""
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity!r}")
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)!r}")
    if args.threads is None and args.device == "cpu":
        args.threads = 1


ModelT = TypeVar("ModelT", bound=nn.Module)


def seeded_random_model(
    model_class: Callable[[Any], ModelT], config: Any, device: torch.device, dtype: torch.dtype
) -> ModelT:
    """``model_class(config)`` from seed 0, created directly on ``device`` in ``dtype``: Hugging Face's init runs there,
    with no float32 copy of billions of weights on the way."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(previous)


def validate_on_cpu(
    task: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    metric: str,
    workdir: str | Path,
    **trainer_kwargs: Any,
) -> float:
    """``metric`` of one validation run of ``task`` on ``datamodule``, by a one-CPU ``Trainer`` writing under
    ``workdir`` without logger, checkpoints, progress bar or model summary; ``trainer_kwargs`` (``callbacks``,
    ``limit_val_batches``, ...) go to the ``Trainer`` as well."""
    from lightning.pytorch import Trainer  # here: the benchmarks that never validate do without Lightning's import

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
        **trainer_kwargs,
    )
    (metrics,) = trainer.validate(task, datamodule=datamodule, verbose=False)
    return float(metrics[metric])
