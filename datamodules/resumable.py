"""Training orders and the training dataloader that a run resumed mid-epoch continues where it stopped.

Lightning saves the state of a training dataloader that has ``state_dict``/``load_state_dict`` in every checkpoint and
restores it on resume. :class:`ResumableLoader` is torchdata's ``StatefulDataLoader``, which keeps the state of its
sampler and its workers; the samplers here give it a state that holds across the end of an epoch as well:
torchdata's own ``RandomSampler`` draws each epoch's permutation when its iterator is made (an extra draw per worker
start, so the order changed with ``num_workers``), and a state taken at the last batch of an epoch, restored into the
next one, gave that epoch another order (``RandomSampler``) or skipped it whole (``StatefulDistributedSampler``).
A checkpoint saved once its epoch had ended (Lightning's default ``ModelCheckpoint``, an epoch that
``limit_train_batches`` cuts short) starts the next epoch as an uninterrupted run does (:class:`ResumableLoader`).
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

NEXT_EPOCH = "next_epoch"
"""The key, in a :class:`ResumableLoader`'s state, of its order's state at the start of the next epoch."""


class ResumableOrder(Sampler[T], Generic[T]):
    """An order drawn from ``generator`` once per epoch (on its first item), whose state is where the epoch stands.

    The state is the generator's state before the epoch's draw and the number of items yielded; restored, the same
    order is drawn again and the items yielded are skipped. At the end of an epoch it is the generator's state after
    the draw and no item, so a run resumed from the last batch of an epoch draws the next epoch's order as an
    uninterrupted run does. Subclasses define the draw, :meth:`_draw`.

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
            if self._yielded == self._size:
                self._draw_at_end(self.generator)
                self._after = self.generator.get_state()
            yield item

    def _draw_at_end(self, generator: torch.Generator) -> None:
        """Draws from ``generator`` once the epoch's last item is taken (none here): an epoch cut short, by
        ``limit_train_batches``, makes none."""

    @property
    def next_epoch(self) -> dict[str, Any] | None:
        """The state at the start of the next epoch: the generator's state after this epoch's draw, no item yielded
        (``None`` before the first draw). An epoch that ``limit_train_batches`` ends early goes on from it."""
        return None if self._after is None else {"generator": self._after, "yielded": 0}

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: ``{"generator": state before its draw, "yielded": items yielded}``."""
        if self._after is not None and self._yielded == self._size:
            return {"generator": self._after, "yielded": 0}
        return {"generator": self._before, "yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration continue the epoch of ``state_dict`` (:meth:`state_dict`)."""
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

    @override
    def _draw_at_end(self, generator: torch.Generator) -> None:
        # Its RandomSampler, once its epoch ran out, drew a permutation more for the `num_samples % n` samples left
        # (none of them): drawn here too, so that every epoch after the first keeps its order as well.
        torch.randperm(self.size, generator=generator)


class EpochDistributedSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (a ``DistributedSampler``, which Lightning keeps) whose state names
    its epoch: the state of another epoch, the one that ended at the checkpoint, is not restored.

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

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("epoch") == self.epoch:
            super().load_state_dict(state_dict)


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``, restored by the ``trainer`` it serves where the epoch of the checkpoint
    stood: mid-epoch, from the state of the batch it stopped at; at the end of the epoch, from the start of the next.

    Lightning restores the state of a training dataloader only when it restarts the epoch of the checkpoint, and
    restores it as it was: a checkpoint saved at the end of an epoch (Lightning's default ``ModelCheckpoint``) got the
    first epoch's order again, and one that ``limit_train_batches`` ended early the rest of that epoch. Here the state
    of an epoch that ended starts the next one, as an uninterrupted run's next iterator does (a loader of a
    :class:`ResumableOrder` saves that start beside its state). It warns once when a run resumed mid-epoch gets no state
    to restore (a checkpoint written before the training dataloader's state was saved), and when the checkpoint was
    saved between two optimizer steps of ``accumulate_grad_batches``, whose gradients no checkpoint holds.

    Args:
        *args: the ``StatefulDataLoader`` arguments.
        trainer: the Trainer it serves (``None``: used on its own, nothing restored).
        **kwargs: the ``StatefulDataLoader`` keyword arguments.
    """

    def __init__(self, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated since: a warning every fit
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self.resumed_batches = resumed_batches(trainer)
        self._epoch_ended = trainer is not None and _restored_at_epoch_end(trainer)
        if trainer is None:
            return
        _warn_between_accumulated_steps(trainer, self.resumed_batches)
        fit_loop = trainer.fit_loop
        if self._epoch_ended and not fit_loop.restarting:
            # Lightning leaves the state of a checkpoint saved after its epoch's end unrestored (it does not restart
            # that epoch); taken once, so that a loader built again for a later epoch starts afresh.
            (state,) = fit_loop._combined_loader_states_to_load
            fit_loop._combined_loader_states_to_load = []
            self.load_state_dict(state)

    def _order(self) -> ResumableOrder | None:
        """The order whose state is the epoch's: the batch sampler's own, or the sampler its batches are cut from."""
        for sampler in (self.batch_sampler, self.sampler):
            if isinstance(sampler, ResumableOrder):
                return sampler
        return None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        order = self._order()
        if order is not None and order.next_epoch is not None:
            state[NEXT_EPOCH] = order.next_epoch
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_batches = 0
        state = dict(state_dict)
        next_epoch = state.pop(NEXT_EPOCH, None)
        order = self._order()
        if self._epoch_ended and order is None:
            return  # a DistributedSampler's order is that of its epoch, which Lightning sets: nothing to go on from
        if self._epoch_ended and order is not None and next_epoch is not None:
            order.load_state_dict(next_epoch)  # a new iterator, as Lightning asks for at each epoch's start
            return
        super().load_state_dict(state)

    @override
    def __iter__(self) -> Any:
        if self.resumed_batches:
            rank_zero_warn(
                f"The checkpoint resumed holds no state of the training dataloader (it was written by an earlier "
                f"version), so the epoch it stopped in after {self.resumed_batches} batches goes on from the first "
                "batch of a new order: some samples of this epoch are seen twice and others not at all. HINT: for a "
                "run equal to an uninterrupted one, start it again: checkpoints of this version keep the dataloader's "
                "state (one of an earlier version, even saved at an epoch's end, gives the next epochs other orders)."
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


def _restored_at_epoch_end(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` holds the training dataloader state of a checkpoint saved once its epoch had ended: after
    the epoch's hooks (Lightning does not restart that epoch) or at its last batch (``limit_train_batches``'s too)."""
    loop = trainer.fit_loop
    if not loop._combined_loader_states_to_load:
        return False
    return not loop.restarting or loop.epoch_loop.batch_progress.is_last_batch


def _warn_between_accumulated_steps(trainer: pl.Trainer, batches: int) -> None:
    """Warn when ``trainer`` resumes an epoch after ``batches`` batches that end between two optimizer steps."""
    pending = batches % trainer.accumulate_grad_batches
    if pending:
        rank_zero_warn(
            f"The checkpoint resumed was saved after {batches} batches of its epoch, between two optimizer steps of "
            f"`accumulate_grad_batches` {trainer.accumulate_grad_batches}: no checkpoint holds the gradients of its "
            f"last {pending} batch{'es' if pending > 1 else ''}, so the next step sums fewer batches than an "
            "uninterrupted run's and the weights differ from it. HINT: save checkpoints on optimizer steps "
            "(`every_n_train_steps`, or `val_check_interval` a multiple of `accumulate_grad_batches`)."
        )


def resume_after_epoch_end_as_at_its_last_batch(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Make the loops of ``checkpoint``, saved after the end of its epoch (``on_train_epoch_end``: Lightning's default
    ``ModelCheckpoint``), those of a checkpoint saved at the epoch's last batch (``on_train_batch_end``), in place,
    when ``trainer`` trains to ``max_steps``.

    Lightning 2.6 restarts a run with ``max_steps`` inside the epoch such a checkpoint ended: it trained one batch more
    in it (none with validation, but then, with ``max_epochs``, it stopped an epoch early). From the last batch, which
    only lacks the epoch's end hooks it then runs, it goes on as an uninterrupted run does.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if trainer.max_steps == -1 or not loops or "epoch_progress" not in loops:
        return
    epochs = loops["epoch_progress"]["total"]
    batches = loops["epoch_loop.batch_progress"]
    ended = epochs["ready"] == epochs["started"] == epochs["processed"] == epochs["completed"] + 1
    if not (ended and batches["is_last_batch"] and len(set(batches["total"].values())) == 1):
        return
    for progress in ("total", "current"):
        loops["epoch_progress"][progress]["processed"] -= 1
        batches[progress]["completed"] -= 1
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # counted again as the last batch's step ends


def warn_without_loader_state_at_epoch_end(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Warn when ``trainer``, whose DataModule serves a :class:`ResumableLoader`, resumes from a checkpoint saved at an
    epoch's end without the training dataloader's state (an earlier version's): the epochs after it are shuffled
    otherwise than an uninterrupted run's. A checkpoint saved mid-epoch warns as its loader starts
    (:class:`ResumableLoader`)."""
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops or "combined_loader" in loops.get("state_dict", {}):
        return
    if not loops.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        return
    rank_zero_warn(
        "The checkpoint resumed holds no state of the training dataloader (it was written by an earlier version), so "
        "the epochs after it are not shuffled as an uninterrupted run's (after the first epoch, the next one trains on "
        "its order again). HINT: for a run equal to an uninterrupted one, start it again: checkpoints of this version "
        "keep the dataloader's state."
    )


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
