"""Rich progress bars for the engine's ``progress(stage, done, total)`` callback."""

from __future__ import annotations

import logging
from types import TracebackType

from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)

_LABELS = {"coarse": "ECoFLaP coarse (scoring)", "fine": "ECoFLaP fine (blocks)"}


class StageProgress:
    """One rich progress bar per pruning stage, shown while the context is open.

    When ``enabled`` is false (other ranks, ``progress=False``) or another live display already owns the terminal
    (e.g. Lightning's ``RichProgressBar`` during validation), progress goes to DEBUG log lines instead. Under
    ``world_size`` ranks the coarse bar counts the showing rank's share of the calibration batches, and says so (the
    fine step's blocks are every rank's).
    """

    def __init__(self, enabled: bool = True, world_size: int = 1) -> None:
        self.enabled = enabled
        self.world_size = world_size
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageProgress:
        if self.enabled:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            try:
                progress.start()
            except LiveError:
                logger.debug("Another live display is active; pruning progress goes to the log.")
            else:
                self._progress = progress
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            logger.debug("%s: %d/%d", stage, done, total)
            return
        if stage not in self._tasks:
            label = _LABELS.get(stage, stage)
            if stage == "coarse" and self.world_size > 1:
                label = f"ECoFLaP coarse (scoring, rank 0's share of {self.world_size} ranks)"
            self._tasks[stage] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
