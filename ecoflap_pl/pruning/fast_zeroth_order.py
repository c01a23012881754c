"""The zeroth-order estimator of :mod:`ecoflap_pl.pruning.zeroth_order` at the cost of far fewer forwards.

Same directions (same seeds), same two-point estimate ``ĝ = (L+ − L−) / (2ε)``, same sums; two savings:

- **Prefix reuse.** Per calibration batch, one dense forward records every block call's output
  (:mod:`ecoflap_pl.pruning.block_outputs`). A probe of a weight in block ``k`` then answers every block call
  that ended before block ``k`` first started from that record, so the upstream blocks and towers do not run.
- **Batched probes.** ``R`` probes share one forward: the batch is repeated ``R`` times along its leading
  dimension and each replica's Linear outputs get its own perturbation ``±ε·x·Zᵀ``
  (:mod:`ecoflap_pl.pruning.perturbation`). ``loss_fn`` returns one scalar for the whole batch, so per-replica
  losses are taken in a second step that needs no knowledge of the loss: the batched forward runs the blocks
  only (it stops after the last block call), then for each replica ``loss_fn(model, batch)`` runs on the
  original batch with *every* block call answered by that replica's slice of the batched outputs. Only the glue
  between blocks (embeddings, projections, the head and the loss itself) runs per replica, and a loss that
  couples the samples of a batch (CLIP's contrastive loss) stays exact.

The weights are never written to: an interrupt leaves them bit-exact, with nothing to restore.

A model dispatched over several devices, or with offloaded weights, is probed where it lives: each recorded output
goes back to the device its block ran on, and the weights of the units probed in one forward (one block's) are held
resident for that forward (:mod:`ecoflap_pl.pruning.residency`) while the other blocks load theirs as usual; answered
block calls do not run, so they load nothing.

What is checked rather than assumed, with a warning and a fallback to the plain per-probe loop: that the model
gives the dense loss again when every block call is answered from the record, that the code after a block never
modifies a recorded output in place, and that every perturbed weight is used through ``F.linear``. A batch whose
blocks do not carry the replicas along the leading dimension falls back to one replica per forward.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.block_outputs import (
    BlockRecord,
    CallKey,
    NotReplicable,
    answered_calls,
    batch_size,
    record_block_calls,
    replica_slice,
    replicate,
    replicate_output,
    stack_blocks,
)
from ecoflap_pl.pruning.calls import hidden_output
from ecoflap_pl.pruning.loss import LossFn, checked_loss
from ecoflap_pl.pruning.monitor import StageMonitor, free_memory_bytes
from ecoflap_pl.pruning.perturbation import LinearPerturbation, Replica
from ecoflap_pl.pruning.residency import Residency, resident
from ecoflap_pl.pruning.zeroth_order import (
    TwoPointSums,
    non_finite_perturbation,
    probe_directions,
    probe_seed,
    zeroth_order_sums,
)

logger = logging.getLogger(__name__)
_STORAGES = ("auto", "device", "cpu", "recompute")
_SHARE_OF_FREE_MEMORY = 0.5
_BYTES_PER_RECORDED_BYTE = 3  # a replica's forward holds about its recorded outputs again in transient activations
_REPLAY_REL_TOL = 1e-6


class _Unsupported(Exception):
    """The model breaks an assumption of the fast path; the plain loop is used instead."""


class _StopForward(Exception):
    """Ends the batched forward after its last block call; caught by type only here."""


@dataclass(frozen=True)
class _Probe:
    unit_index: int
    unit: str
    probe: int
    start: int


def choose_replicas(max_replicas: int, recorded_bytes: int, device: torch.device) -> tuple[int, int]:
    """Replicas per forward, from the memory left on ``device``; returns ``(replicas, free bytes)``.

    A replica costs about ``3 x`` the recorded block outputs of one batch (its own outputs, kept for the per-replica
    losses, plus the forward's transient activations); at most half the free memory is used. More than one replica
    is always an even number, so the ± pair of a direction shares a forward.
    """
    free = free_memory_bytes(device)
    if max_replicas <= 1:
        return 1, free
    per_replica = max(1, _BYTES_PER_RECORDED_BYTE * recorded_bytes)
    replicas = max(1, min(max_replicas, int(_SHARE_OF_FREE_MEMORY * free) // per_replica))
    return (replicas - replicas % 2 if replicas > 1 else 1), free


class _BatchProber:
    """Probe losses on one calibration batch, with its dense block record."""

    def __init__(
        self,
        model: nn.Module,
        blocks: Mapping[str, nn.Module],
        loss_fn: LossFn,
        batch_id: int,
        batch: Any,
        record: BlockRecord,
        eps: float,
        monitor: StageMonitor,
    ) -> None:
        self.model, self.blocks, self.loss_fn = model, blocks, loss_fn
        self.batch_id, self.batch, self.record = batch_id, batch, record
        self.eps, self.monitor = eps, monitor
        self.last_call = max(record.ends, key=record.ends.__getitem__)

    def _loss(self, handler: Callable[[CallKey, Callable[[], Any]], Any], batch: Any) -> float:
        with answered_calls(self.blocks, handler):
            loss = float(checked_loss(self.loss_fn, self.model, batch, self.batch_id))
        self.monitor.full_forwards += 1
        return loss

    def check_replay(self) -> None:
        """Check that the loss with every block call answered from the record is the dense loss.

        Raises:
            _Unsupported: when it is not, or when the code after a block modified its recorded output in place.
        """
        replayed = self._loss(lambda key, run: self.record.output(key), self.batch)
        if not self.record.check_unchanged():
            raise _Unsupported("the model modified a recorded block output in place")
        if not math.isclose(replayed, self.record.loss, rel_tol=_REPLAY_REL_TOL):
            raise _Unsupported(
                f"answering the block calls from the record gives the loss {replayed!r}, "
                f"not the dense {self.record.loss!r}"
            )

    def losses(self, replicas: Sequence[Replica], start: int, names: Sequence[str]) -> list[float]:
        """The loss of each replica's perturbation (of the units ``names``); block calls that ended before event
        ``start`` are answered.

        Raises:
            FloatingPointError: when a perturbed loss is not finite (the dense one is): ``eps`` is too large.
        """
        try:
            return self._losses(replicas, start)
        except FloatingPointError as error:
            raise non_finite_perturbation(str(sorted(set(names))), self.eps, self.batch_id) from error

    def _losses(self, replicas: Sequence[Replica], start: int) -> list[float]:
        answered = self.record.finished_before(start)
        mode = LinearPerturbation(replicas, self.eps)
        if len(replicas) == 1:

            def single(key: CallKey, run: Callable[[], Any]) -> Any:
                if key in answered:
                    return self.record.output(key)
                self.monitor.block_forwards += 1
                return run()

            with mode:
                values = [self._loss(single, self.batch)]
        else:
            values = self._batched_losses(mode, answered)
        if mode.unperturbed():
            raise _Unsupported(
                f"{len(mode.unperturbed())} perturbed weight(s) were never used in an F.linear call, or used by other "
                "operations as well"
            )
        if not self.record.check_unchanged():
            raise _Unsupported("the model modified a recorded block output in place")
        return values

    def _batched_losses(self, mode: LinearPerturbation, answered: set[CallKey]) -> list[float]:
        count = mode.count
        computed: dict[CallKey, Any] = {}

        def batched(key: CallKey, run: Callable[[], Any]) -> Any:
            if key in answered:
                output = replicate_output(self.record.output(key), count)
            else:
                output = run()
                self.monitor.block_forwards += count
                dense = self.record.outputs.get(key)
                if dense is None or hidden_output(output).shape[0] != count * hidden_output(dense).shape[0]:
                    raise NotReplicable(f"block call {key} does not carry {count} replicas")
                computed[key] = output
            if key == self.last_call:
                raise _StopForward
            return output

        replicated = replicate(self.batch, count, batch_size(self.batch))
        try:
            with answered_calls(self.blocks, batched), mode:
                self.loss_fn(self.model, replicated)
        except _StopForward:
            pass
        # an input without the batch dimension (e.g. Qwen-VL's flat patch sequence beside its per-image grid, which
        # index each other: IndexError/ValueError), or out of memory with the copies (RuntimeError)
        except (RuntimeError, IndexError, ValueError) as error:
            raise NotReplicable(f"the forward on {count} copies of the batch failed ({error})") from error
        self.monitor.full_forwards += 1
        values = []
        for index in range(count):

            def sliced(key: CallKey, run: Callable[[], Any], index: int = index) -> Any:
                if key in computed:
                    return replica_slice(computed[key], self.record.outputs[key], count, index)
                if key in self.record.outputs:
                    return self.record.output(key)
                raise NotReplicable(f"block call {key} did not run in the dense forward")

            values.append(self._loss(sliced, self.batch))
        return values


def _owner(name: str, blocks: Mapping[str, nn.Module]) -> str:
    """The block holding the parameter ``name`` ("" when none does)."""
    return max((block for block in blocks if name.startswith(block + ".")), key=len, default="")


def _probes(
    units: Mapping[str, Sequence[str]], blocks: Mapping[str, nn.Module], record: BlockRecord, probes: int
) -> list[_Probe]:
    """Every (unit, probe) with the event at which the unit's first block call starts, earliest first."""
    first_start: dict[str, int] = {}
    for (name, _), start in record.starts.items():
        first_start[name] = min(start, first_start.get(name, start))
    found: list[_Probe] = []
    for unit_index, (unit, members) in enumerate(units.items()):
        starts = [first_start.get(_owner(member, blocks), 0) for member in members]
        found.extend(_Probe(unit_index, unit, probe, min(starts)) for probe in range(probes))
    return sorted(found, key=lambda p: p.start)


def _storage_device(storage: str, device: torch.device, recorded_bytes: int) -> torch.device | None:
    """Where the recorded outputs are kept: None (where their blocks ran) or the CPU."""
    if storage == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if storage == "device":
        return None
    return None if recorded_bytes <= _SHARE_OF_FREE_MEMORY * free_memory_bytes(device) / 2 else torch.device("cpu")


def _parameter_names(model: nn.Module, units: Mapping[str, Sequence[nn.Parameter | str]]) -> dict[str, list[str]]:
    """Every unit's members by parameter name (a dispatched model replaces offloaded parameter objects)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {unit: [m if isinstance(m, str) else names[id(m)] for m in members] for unit, members in units.items()}


@torch.no_grad()
def fast_zeroth_order_sums(
    model: nn.Module,
    units: Mapping[str, Sequence[nn.Parameter | str]],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    eps: float,
    probes: int,
    seed: int,
    monitor: StageMonitor,
    max_replicas: int,
    storage: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
    residency: Residency | None = None,
) -> dict[str, float]:
    """``s_u = Σ_b mean_k |ĝ_{u,b,k}|`` for every unit, equal to :func:`zeroth_order_sums` (same seeds) up to the
    rounding of ``x·(W ± εZ)ᵀ`` against ``x·Wᵀ ± ε·x·Zᵀ``.

    Args:
        units: unit name -> the parameters perturbed together (or their names).
        batches: ``(global batch id, batch)`` pairs.
        eps, probes, seed: as for :func:`zeroth_order_sums`.
        monitor: counts ``loss_fn`` calls as full forwards (the replay and per-replica calls run only the glue
            between blocks) and block calls that really ran as block forwards, one per replica.
        max_replicas: most probes per forward (1: one forward per probe, prefix reuse only); the number used is
            chosen from the memory left.
        storage: where recorded block outputs live: ``"device"``, ``"cpu"`` (offloaded, copied back per call) or
            ``"auto"`` (the device while a batch's record takes at most a quarter of its free memory); or
            ``"recompute"``: nothing recorded, the plain loop of :func:`zeroth_order_sums` (one full forward per
            probe), which is also the fallback for a model the fast path does not apply to.
        on_progress: ``on_progress(done, total)`` after each forward of probes.
        residency: holds the offloaded weights of the units probed in one forward resident for that forward
            (nothing is written back); a forward's probes then all lie in one block.
    """
    if storage not in _STORAGES:
        raise ValueError(f"`storage` must be one of {list(_STORAGES)}, got {storage!r}.")
    names = _parameter_names(model, units)
    if storage != "recompute":
        try:
            return _fast_sums(
                model,
                names,
                batches,
                loss_fn,
                eps,
                probes,
                seed,
                monitor,
                max_replicas,
                storage,
                on_progress,
                residency,
            )
        except _Unsupported as reason:
            logger.warning(
                "Prefix reuse and batched probes do not apply to this model (%s); probing with one full forward per "
                "probe instead. HINT: set activation_storage: recompute to choose this path directly.",
                reason,
            )
    done = itertools.count(1)  # progress (where a stop request is honoured) goes on unit by unit
    return zeroth_order_sums(
        model,
        names,
        batches,
        loss_fn,
        eps=eps,
        probes=probes,
        seed=seed,
        monitor=monitor,
        on_unit_done=None if on_progress is None else lambda: on_progress(next(done), len(units)),
        residency=residency,
    )


def _fast_sums(
    model: nn.Module,
    units: Mapping[str, Sequence[str]],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    eps: float,
    probes: int,
    seed: int,
    monitor: StageMonitor,
    max_replicas: int,
    storage: str,
    on_progress: Callable[[int, int], None] | None,
    residency: Residency | None,
) -> dict[str, float]:
    blocks = stack_blocks(model)
    sums = TwoPointSums(units, eps, probes)
    replicas = max_replicas
    done = 0
    where: torch.device | None = None
    for position, (batch_id, batch) in enumerate(batches):
        record = record_block_calls(blocks, partial(checked_loss, loss_fn, model, batch, batch_id), where)
        monitor.full_forwards += 1
        if not record.outputs:
            raise _Unsupported("no block of a discovered stack ran")
        if position == 0:
            device = record.devices[min(record.starts, key=record.starts.__getitem__)]  # where the first block ran
            where = _storage_device(storage, device, record.nbytes)
            record = record.to(where)
            replicas, free = choose_replicas(max_replicas, record.nbytes, device)
            monitor.recorded_bytes = record.nbytes
            logger.info(
                "Zeroth-order probes: %d block calls recorded per batch (%.1f MiB on %s), %d probe(s) per forward "
                "(at most %d; %.1f GiB free on %s)",
                len(record.outputs),
                record.nbytes / 2**20,
                where or "the devices of the blocks",
                replicas,
                max_replicas,
                free / 2**30,
                device,
            )
        prober = _BatchProber(model, blocks, loss_fn, batch_id, batch, record, eps, monitor)
        if position == 0:
            prober.check_replay()
        pending = _probes(units, blocks, record, probes)
        while pending:
            pairs = max(1, replicas // 2)
            total = done + -(-len(pending) // pairs) + (len(batches) - position - 1) * -(-len(units) * probes // pairs)
            chunk = pending[:pairs]
            if residency is not None:  # one block's weights resident at a time
                chunk = [p for p in chunk if p.start == pending[0].start]  # sorted by start: a leading run
            pending = pending[len(chunk) :]
            offloaded = [m for p in chunk for m in units[p.unit] if residency is not None and residency.offloaded(m)]
            try:
                with resident(residency, sorted(set(offloaded)), write_back=False):
                    values = _chunk_losses(model, prober, units, chunk, seed, batch_id, replicas)
            except NotReplicable as reason:
                logger.warning(
                    "Batched probes fall back to one probe per forward: %s. HINT: set max_probe_replicas: 1.", reason
                )
                replicas, pending = 1, chunk + pending
                continue
            for index, p in enumerate(chunk):
                sums.add(p.unit, values[2 * index], values[2 * index + 1])
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        del record, prober
    monitor.probe_replicas = replicas
    return sums.finish(len(batches))


def _chunk_losses(
    model: nn.Module,
    prober: _BatchProber,
    units: Mapping[str, Sequence[str]],
    chunk: Sequence[_Probe],
    seed: int,
    batch_id: int,
    replicas: int,
) -> list[float]:
    """The ``+`` and ``-`` loss of every probe of ``chunk``, in probe order (the weights are looked up by name: a
    resident offloaded weight is a tensor of its own while it is held)."""
    tensors = {p.unit: [model.get_parameter(name) for name in units[p.unit]] for p in chunk}
    signed = [
        Replica(
            tuple(tensors[p.unit]),
            tuple(probe_directions(tensors[p.unit], probe_seed(seed, p.unit_index, batch_id, p.probe))),
            sign,
        )
        for p in chunk
        for sign in (1.0, -1.0)
    ]
    names = [p.unit for p in chunk]
    if replicas == 1:
        return [prober.losses([replica], chunk[0].start, names)[0] for replica in signed]
    return prober.losses(signed, chunk[0].start, names)
