"""Rich progress bars for the demo's one-off builds (data generation, model training), so a first run never looks
stuck."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from typing_extensions import override

from ecoflap_pl.demo.data import Progress as ProgressCallback


@contextmanager
def stage_bars(title: str) -> Iterator[ProgressCallback]:
    """A ``progress(stage, done, total)`` callback that draws one rich bar per stage, under ``title``.

    The bars start with the first stage reported: a cached build reports none and prints nothing (a rich ``Progress``
    stopped without tasks still prints an empty line).
    """
    bars = Progress(
        TextColumn(f"[bold]{title}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            if not tasks:
                bars.start()
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bars.stop()


class StepBar(Callback):
    """One rich bar over a run's optimizer steps (``trainer.max_steps``), with the training loss.

    Lightning's own bars count batches per epoch; the demo models train by steps over an endless epoch count, where
    they would show one bar per epoch and totals such as ``Epoch 3/-2``.
    """

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title
        self._bars: Progress | None = None
        self._task: TaskID | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._bars = Progress(
            TextColumn(f"[bold]{self.title}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[loss]}"),
        )
        self._bars.start()
        self._task = self._bars.add_task("steps", total=trainer.max_steps, loss="")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bars is None or self._task is None:
            return
        loss = trainer.callback_metrics.get("train/loss")
        self._bars.update(
            self._task, completed=trainer.global_step, loss="" if loss is None else f"loss {float(loss):.3f}"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    on_exception = on_train_end  # type: ignore[assignment]
