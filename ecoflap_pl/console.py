"""What the ``ecoflap`` command prints: its progress bars, tables and file paths, without its libraries' chatter.

Lightning logs hardware banners ("GPU available: ..."), a promotional tip on every Trainer without its paid logger,
"Seed set to ...", "`Trainer.fit` stopped: `max_steps=...` reached." and, when a task's learning-rate schedule asks
for the number of steps, "Loading `train_dataloader` to estimate number of stepping batches." at INFO, and one of
its modules triggers a deprecation warning of torch's pytree API. transformers draws a tqdm bar of its own whenever
it loads or saves a model ("Loading weights", "Writing model shards"), beside the command's progress bars. None of
it tells a user anything about their run; the filters below drop exactly those messages and bars and nothing else
(warnings and errors still show, and so do the hub's download bars).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as transformers_logging

_BANNERS = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "Seed set to",
    "`Trainer.fit` stopped:",
    "Loading `train_dataloader` to estimate number of stepping batches.",
)
_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


_RANK_PREFIX = re.compile(r"^\[rank: \d+\] ")
"""What Lightning puts before a message on every rank of a run started by ``torchrun`` or ``srun`` ("Seed set to")."""


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _RANK_PREFIX.sub("", record.getMessage(), count=1).startswith(_BANNERS)


def quiet_libraries() -> None:
    """Drop Lightning's banners, tips and deprecation warning, and transformers' load/save bars (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropBanners) for existing in logger.filters):
            logger.addFilter(_DropBanners())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    transformers_logging.disable_progress_bar()


@contextmanager
def warnings_in_one_line() -> Iterator[None]:
    """Print each warning as ``Category: message`` while the block runs, without Python's ``path:line:`` before it
    and the source line after it (``rank_zero_warn(``): where in a library a warning was raised tells a user of the
    command nothing. Python's format is put back afterwards."""

    def one_line(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        return f"{category.__name__}: {message}\n"

    python_format = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = python_format
