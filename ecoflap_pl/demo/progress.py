"""Rich progress bars for the demo's one-off builds (data generation), so a first run never looks stuck."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ecoflap_pl.demo.data import Progress as ProgressCallback


@contextmanager
def stage_bars(title: str) -> Iterator[ProgressCallback]:
    """A ``progress(stage, done, total)`` callback that draws one rich bar per stage, under ``title``."""
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
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update
