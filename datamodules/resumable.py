"""Training orders and the training dataloader that a run resumed mid-epoch continues where it stopped.

Lightning saves the state of a training dataloader that has ``state_dict``/``load_state_dict`` in every checkpoint and
restores it on resume. :class:`ResumableLoader` is torchdata's ``StatefulDataLoader``, which keeps the state of its
sampler and its workers; the samplers here give it a state that holds across the end of an epoch as well:
torchdata's own ``RandomSampler`` draws each epoch's permutation when its iterator is made (an extra draw per worker
start, so the order changed with ``num_workers``), and a state taken at the last batch of an epoch, restored into the
next one, gave that epoch another order (``RandomSampler``) or skipped it whole (``StatefulDistributedSampler``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from typing_extensions import override

T = TypeVar("T")


class ResumableOrder(Sampler[T], Generic[T]):
    """An order drawn from ``generator`` once per epoch (on its first item), whose state is where the epoch stands.

    The state is the generator's state before the epoch's draw and the number of items yielded; restored, the same
    order is drawn again and the items yielded are skipped. At the end of an epoch it is the generator's state after
    the draw and no item, so a run resumed from the last batch of an epoch draws the next epoch's order as an
    uninterrupted run does. Subclasses define the draw, :meth:`_draw`.

    A mid-epoch state also holds the generator's state after the draw: a run whose epochs end before their orders do
    (``limit_train_batches``), restored from an epoch's last batch (``restored_at_epoch_end``), draws the next order
    from it rather than going on with the rest of the one that epoch stopped in.

    Args:
        generator: the source of every draw, advanced by one draw per epoch.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._before = generator.get_state()
        self._after: torch.Tensor | None = None
        self._size = 0
        self._yielded = 0
        self._resume: tuple[torch.Tensor, int] | None = None
        self.restored_at_epoch_end = False

    def _draw(self, generator: torch.Generator) -> list[T]:
        """The order of one epoch, drawn from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _draw(generator).")

    def __iter__(self) -> Iterator[T]:
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
        self._before = self.generator.get_state()
        order = self._draw(self.generator)
        self._after, self._size, self._yielded = self.generator.get_state(), len(order), skip
        for item in order[skip:]:
            self._yielded += 1
            yield item

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: ``{"generator": state before its draw, "yielded": items yielded, "next": state
        after its draw}`` (no ``"next"`` before the first draw, nor once the order is done: the next epoch's state)."""
        if self._after is not None and self._yielded == self._size:
            return {"generator": self._after, "yielded": 0}
        after = {} if self._after is None else {"next": self._after}
        return {"generator": self._before, "yielded": self._yielded, **after}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration continue the epoch of ``state_dict`` (:meth:`state_dict`), or start the next one
        where ``restored_at_epoch_end`` says the run's epoch ended there."""
        if self.restored_at_epoch_end and "next" in state_dict:
            self._resume = (state_dict["next"], 0)
        else:
            self._resume = (state_dict["generator"], state_dict["yielded"])


class ShuffledIndices(ResumableOrder[int]):
    """A random permutation of ``range(size)`` per epoch, the order of ``DataLoader(shuffle=True, generator=...)``.

    Args:
        size: the number of samples.
        generator: the source of the permutations.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        super().__init__(generator)
        self.size = size

    def __len__(self) -> int:
        return self.size

    @override
    def _draw(self, generator: torch.Generator) -> list[int]:
        # The DataLoader(shuffle=True, generator=...) this replaces drew its workers' base seed from the same generator
        # before each permutation: drawn here too, so that a run sees its samples in the order it did before.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.size, generator=generator).tolist()


class EpochDistributedSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (a ``DistributedSampler``, which Lightning keeps) whose state names
    its epoch: the state of another epoch, the one that ended at the checkpoint, is not restored, nor that of an epoch
    that ended before its order did (``limit_train_batches``; ``restored_at_epoch_end``, as for
    :class:`ResumableOrder`).

    Args:
        dataset: the training split.
        num_replicas: the number of processes.
        rank: this process's rank.
        seed: the seed of the shuffle, offset by the epoch.
        epoch: the epoch it serves first (Lightning sets the next ones, after the first iterator is made).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int, epoch: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self.restored_at_epoch_end = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("epoch") == self.epoch and not self.restored_at_epoch_end:
            super().load_state_dict(state_dict)


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``, which warns once when a run resumed mid-epoch gets no state to restore
    (a checkpoint written before the training dataloader's state was saved).

    Args:
        *args: the ``StatefulDataLoader`` arguments.
        resumed_batches: the batches of the current epoch the restored run has already trained on (0: none).
        restored_at_epoch_end: whether the run was restored from the last batch of an epoch (see
            :class:`ResumableOrder`).
        **kwargs: the ``StatefulDataLoader`` keyword arguments.
    """

    def __init__(
        self, *args: Any, resumed_batches: int = 0, restored_at_epoch_end: bool = False, **kwargs: Any
    ) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated since: a warning every fit
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self.resumed_batches = resumed_batches
        for order in (self.sampler, self.batch_sampler):
            if isinstance(order, ResumableOrder | EpochDistributedSampler):
                order.restored_at_epoch_end = restored_at_epoch_end

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_batches = 0
        super().load_state_dict(state_dict)

    @override
    def __iter__(self) -> Any:
        if self.resumed_batches:
            rank_zero_warn(
                f"The checkpoint resumed holds no state of the training dataloader (it was written by an earlier "
                f"version), so the epoch it stopped in after {self.resumed_batches} batches goes on from the first "
                "batch of a new order: some samples of this epoch are seen twice and others not at all. HINT: resume "
                "from a checkpoint saved at the end of an epoch for a run equal to an uninterrupted one."
            )
            self.resumed_batches = 0
        return super().__iter__()


def resumed_batches(trainer: pl.Trainer | None) -> int:
    """The batches of the current epoch that ``trainer``, restored from a checkpoint saved mid-epoch, has trained on
    (as the checkpoint says); 0 when it starts an epoch (a new run, a checkpoint at the end of an epoch)."""
    if trainer is None:
        return 0
    loop = trainer.fit_loop.epoch_loop
    if not loop.restarting or loop.batch_progress.is_last_batch:
        return 0
    return loop.batch_progress.current.ready


def restored_at_epoch_end(trainer: pl.Trainer | None) -> bool:
    """Whether ``trainer`` was restored from a checkpoint saved at the last batch of an epoch, which may be before
    the end of its order (``limit_train_batches``)."""
    if trainer is None:
        return False
    loop = trainer.fit_loop.epoch_loop
    return loop.restarting and loop.batch_progress.is_last_batch


def drop_loader_built_before_restore(trainer: pl.Trainer) -> None:
    """Make a ``fit`` that restores a checkpoint build its training dataloader again once the loops are restored.

    ``trainer.estimated_stepping_batches`` (a learning-rate schedule's length, read in ``configure_optimizers``) builds
    the training dataloader when ``max_epochs`` is set, before Lightning restores the checkpoint's loops; the fit loop
    keeps it, built for the first epoch and never given the dataloader state the checkpoint holds, so the epoch it
    resumes would start from its first batch again, without a word. Call this after ``configure_optimizers`` and
    before the restore (``on_fit_start``).
    """
    if trainer.ckpt_path is not None:
        trainer.fit_loop._combined_loader = None
