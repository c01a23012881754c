"""Random draws of a training step that a resumed fit repeats: each step seeds the global generators from where it is.

Lightning keeps no random state in its checkpoints, so a fit resumed from one drew other dropout masks and other
augmentations than the uninterrupted run (whose generators had advanced through every step before), and ended with
other weights even where the batches were the same (``datamodules/resumable.py``). Here every training batch seeds
Python's ``random``, NumPy's global generator and torch's (CPU and CUDA) from the run's base seed, its epoch, the
batch's index in the epoch and the process's rank (as fairseq seeds each update): a step draws the same numbers
whether the run stopped before it or not. The base seed is ``seed_everything``'s, else one drawn from torch's
generator; rank 0's is used on every rank and kept in every checkpoint, so a resumed run goes on with the seed it
started with whatever ``seed_everything`` says then.

Draws made in dataloader workers (a collator's own randomness) are not seeded here.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

STEP_SEED = "ecoflap_step_seed"
"""The key, in a checkpoint, of the base seed of its run's training steps."""


def restored_step_seed(checkpoint: dict[str, Any]) -> int | None:
    """The base seed kept in ``checkpoint`` (``None`` in one written before it was kept); refused where it is not a
    non-negative integer (a file changed after it was written), before the first step would fail on it."""
    seed = checkpoint.get(STEP_SEED)
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        return seed
    raise ValueError(
        f"The checkpoint's `{STEP_SEED}` is {seed!r}, not the non-negative integer ecoflap-pl writes: the file was "
        "changed after it was written. HINT: resume from another checkpoint, or delete that key from this one to seed "
        "the training steps from `seed_everything` again."
    )


def base_step_seed(trainer: pl.Trainer, restored: int | None) -> int:
    """The base seed of the training steps of the fit ``trainer`` starts: the checkpoint's (``restored``), else
    ``seed_everything``'s (``PL_GLOBAL_SEED``), else one drawn from torch's generator; rank 0's on every rank."""
    if restored is not None:
        return restored
    seed = os.environ.get("PL_GLOBAL_SEED", "")
    # Without `seed_everything` (or with a value it would not take either), one draw of torch's generator: a run
    # seeded by `torch.manual_seed` alone (the demo's training) stays reproducible.
    base = int(seed) % 2**64 if seed.lstrip("-").isdigit() else int(torch.randint(2**32, ()))
    return int(trainer.strategy.broadcast(base, src=0))


def seed_training_batch(base: int, trainer: pl.Trainer, batch_idx: int) -> None:
    """Seed the global generators for the training batch ``batch_idx`` of the current epoch on this rank."""
    words = np.random.SeedSequence([base, trainer.current_epoch, batch_idx, trainer.global_rank]).generate_state(2)
    seed = int(words[0]) << 32 | int(words[1])
    random.seed(seed)
    np.random.seed(int(words[0]))
    torch.manual_seed(seed)
