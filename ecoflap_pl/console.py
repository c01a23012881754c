"""What the ``ecoflap`` command prints: its progress bars, tables and file paths, without Lightning's chatter.

Lightning logs hardware banners ("GPU available: ..."), a promotional tip on every Trainer without its paid logger,
"Seed set to ..." and "`Trainer.fit` stopped: `max_steps=...` reached." at INFO, and one of its modules triggers a
deprecation warning of torch's pytree API. None of it tells a user anything about their run; the filters below drop
exactly those messages and nothing else (Lightning's warnings and errors still show).
"""

from __future__ import annotations

import logging
import warnings

_BANNERS = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "Seed set to",
    "`Trainer.fit` stopped:",
)
_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_BANNERS)


def quiet_lightning() -> None:
    """Drop Lightning's banners, tips and its own deprecation warnings from the console (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropBanners) for existing in logger.filters):
            logger.addFilter(_DropBanners())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
