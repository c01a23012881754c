"""``prune()``: discovery, the coarse step (scores -> per-group sparsity) and the fine step, transactionally."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial, wraps
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from ecoflap_pl.pruning.allocation import (
    AllocationRequest,
    check_report_fits,
    dense_outlier_ratios,
    get_allocation,
    read_allocation_report,
)
from ecoflap_pl.pruning.block_outputs import batch_size
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.discovery import (
    Candidate,
    Stack,
    build_groups,
    find_candidates,
    find_stacks,
    order_stacks,
)
from ecoflap_pl.pruning.fine import AllReduce, fine_prune_
from ecoflap_pl.pruning.importance import ImportanceRequest, get_importance, importance_names
from ecoflap_pl.pruning.loss import LossFn, checked_loss
from ecoflap_pl.pruning.monitor import StageMonitor, StageStats, over_ranks
from ecoflap_pl.pruning.residency import Residency, resident
from ecoflap_pl.pruning.result import GroupScores, PruningResult
from ecoflap_pl.pruning.transaction import WeightTransaction, pruning_session

logger = logging.getLogger(__name__)
_Read = TypeVar("_Read")
_Result = TypeVar("_Result")
_P = ParamSpec("_P")
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, called as each unit of work of a stage finishes."""

_SCORE_SETTINGS = (
    "importance",
    "score",
    "aggregate",
    "granularity",
    "probe_granularity",
    "include",
    "exclude",
    "coarse_samples",
    "eps",
    "probes",
    "seed",
)
_PRIOR_SPARSITY_WARNING = 0.01


@dataclass(frozen=True)
class _Plan:
    stacks: list[Stack]
    skipped: list[Stack]
    excluded: list[Stack]
    candidates: list[Candidate]
    groups: dict[str, tuple[str, ...]]
    towers: dict[str, tuple[str, ...]]
    sizes: dict[str, int]


def _ticker(progress: Progress | None, stage: str, total: int) -> Callable[[], None]:
    """A callable that reports one more finished unit of ``stage`` (out of ``total``) to ``progress``."""
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total)

    return step


def _block_count(plan: _Plan) -> int:
    return sum(len(stack.blocks) for stack in plan.stacks)


def _leading_count(sizes: Sequence[int], samples: int) -> tuple[int, int]:
    """How many leading batches of ``sizes`` samples each hold ``samples`` samples (all when fewer), and how many
    samples they hold."""
    count = seen = 0
    for size in sizes:
        if seen >= samples:
            break
        count += 1
        seen += size
    return count, seen


def _leading_batches(batches: Sequence[Any], samples: int) -> list[tuple[int, Any]]:
    """The first batches holding ``samples`` samples (all when fewer, see :func:`_short_calibration`), with their
    global ids."""
    count = _leading_count([batch_size(batch) for batch in batches], samples)[0]
    return [(batch_id, batches[batch_id]) for batch_id in range(count)]


def _samples_of(batches: Sequence[tuple[int, Any]]) -> int:
    """The samples in ``batches`` (``(batch id, batch)`` pairs), as the report records what a step read."""
    return sum(batch_size(batch) for _, batch in batches)


def _short_calibration(sizes: Sequence[int], config: PruningConfig, steps: Sequence[str], holdout: bool) -> str | None:
    """One message for a calibration set smaller than ``steps`` (``"coarse"``, ``"fine"``) and, with ``holdout``,
    ``auto``'s held-out batches ask for, naming what is used instead and the fields to lower; ``None`` when it is
    large enough.

    One cause, one message for every step (an ecoflap DataModule that capped the set logs that at DEBUG only).
    """
    given = sum(sizes)
    short = [f"{step}_samples" for step in steps if getattr(config, f"{step}_samples") > given]
    if short:
        asked = " and ".join(f"`{field}` is {getattr(config, field)}" for field in short)
        uses = "both steps use" if len(short) == 2 else f"the {short[0].removesuffix('_samples')} step uses"
        return (
            f"Only {given} calibration samples were given, but {asked}: {uses} all {given}. HINT: lower "
            f"{' and '.join(f'`{field}`' for field in short)} to {given}, or give more calibration samples."
        )
    if not holdout or given >= config.calibration_samples:
        return None
    leading = _leading_count(sizes, max(getattr(config, f"{step}_samples") for step in steps))[1]
    left = given - leading
    return (
        f"Only {given} calibration samples were given, but the run asks for {config.calibration_samples}: allocation "
        f"'auto' holds out the {left} left after the {leading} of the coarse and fine steps, not "
        f"`auto_holdout_samples` ({config.auto_holdout_samples}). HINT: lower `auto_holdout_samples` to {left}, or "
        "give more calibration samples."
    )


def _holdout_ids(sizes: Sequence[int], config: PruningConfig) -> range:
    """The ids of ``auto``'s held-out batches: those after the fine step's (and, with scores, the coarse step's)
    leading batches, ``auto_holdout_samples`` samples.

    Raises:
        ValueError: when no batch is left after those of the coarse and fine steps.
    """
    start = _leading_count(sizes, config.fine_samples)[0]
    if config.scores_groups:
        start = max(start, _leading_count(sizes, config.coarse_samples)[0])
    count = _leading_count(sizes[start:], config.auto_holdout_samples)[0]
    if not count:
        raise ValueError(
            f"`allocation` 'auto' needs held-out calibration batches after the {start} that the coarse and fine "
            f"steps use, but only {len(sizes)} were given. HINT: pass {config.calibration_samples} calibration "
            "samples (PruningConfig.calibration_samples), or lower coarse_samples / fine_samples."
        )
    return range(start, start + count)


def check_calibration_sizes(
    batch_sizes: Sequence[int], config: PruningConfig, *, world_size: int = 1, coarse: bool = True
) -> None:
    """The checks of :func:`prune` on its calibration batches that need only their sizes: every one of
    ``world_size`` ranks gets a batch of each step, and ``auto`` has held-out batches left.

    They depend on nothing a rank holds alone, so a caller that starts processes (a DDP launcher) runs them before it
    starts them, and a refusal is said once, not once per process.

    Args:
        batch_sizes: the number of samples of each calibration batch, in order.
        config: the run's configuration.
        world_size: number of ranks.
        coarse: whether the coarse step scores groups (``False`` with ``importance="uniform"`` or given scores).

    Raises:
        ValueError: a set too short for the ranks or for ``auto``'s held-out batches, with a ``HINT``.
    """
    _check_shards(batch_sizes, config, world_size, ("coarse", "fine") if coarse else ("fine",))
    if config.allocation == "auto":
        _holdout_ids(batch_sizes, config)


def _heldout_loss(
    model: nn.Module,
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    all_reduce: AllReduce | None,
    rank: int,
    world_size: int,
    monitor: StageMonitor,
) -> float:
    """The sample-weighted mean calibration loss over ``batches``; with ``all_reduce`` each rank evaluates its share
    (``id % world_size == rank``) and the sums are reduced, so every rank gets the same value. ``monitor`` counts
    this rank's forwards."""
    own = [(i, batch) for i, batch in batches if all_reduce is None or i % world_size == rank]
    sums = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for batch_id, batch in own:
        size = batch_size(batch)
        sums[0] += float(checked_loss(loss_fn, model, batch, batch_id)) * size
        sums[1] += size
        monitor.full_forwards += 1
    if all_reduce is not None:
        sums = all_reduce(sums)
    return float(sums[0] / sums[1])


def _add(first: StageStats | None, second: StageStats) -> StageStats:
    """Two runs of one stage as one: counts and seconds add up, the peak memory is the larger."""
    if first is None:
        return second
    return replace(
        second,
        full_forwards=first.full_forwards + second.full_forwards,
        block_forwards=first.block_forwards + second.block_forwards,
        backward_passes=first.backward_passes + second.backward_passes,
        seconds=first.seconds + second.seconds,
        peak_memory_bytes=max(first.peak_memory_bytes, second.peak_memory_bytes),
    )


def _shard(batches: list[tuple[int, Any]], rank: int, world_size: int) -> list[tuple[int, Any]]:
    """This rank's share of ``batches``: ``id % world_size == rank`` (never empty after ``_check_shards``)."""
    return [(batch_id, batch) for batch_id, batch in batches if batch_id % world_size == rank]


def _check_shards(sizes: Sequence[int], config: PruningConfig, world_size: int, steps: Sequence[str]) -> None:
    """Refuse a calibration set too short to give every rank a batch of each of ``steps`` (``"coarse"``, ``"fine"``).

    Depends only on the batch sizes (every rank holds every batch) and ``world_size``, so every rank raises the same
    error before any collective call; a rank left without a batch would otherwise wait forever in all-reduce.
    """
    for step in steps:
        field = f"{step}_samples"
        samples = getattr(config, field)
        count = _leading_count(sizes, samples)[0]
        if count < world_size:
            raise ValueError(
                f"Each of the {world_size} ranks needs at least one calibration batch, but the {step} step uses only "
                f"{count}: rank {count} of {world_size} got no calibration batch ({count} batches in all). HINT: raise "
                f"`{field}` (now {samples}) or lower the calibration batch size."
            )


def _warn(message: str | None) -> None:
    if message is not None:
        logger.warning(message)


_ENGINE_LOGGER = logging.getLogger("ecoflap_pl.pruning")


def _warnings_on_rank_zero(function: Callable[_P, _Result]) -> Callable[_P, _Result]:
    """Run ``function(..., rank=...)`` with the engine's warnings (every ``ecoflap_pl.pruning`` logger) said on rank 0
    only: every rank holds the same model, configuration and batch sizes, and would say them alike (the engine sees no
    Lightning, so the rank is the one it is given). A warning about the calibration batches themselves (probes that saw
    no change of the loss) speaks of rank 0's share."""

    @wraps(function)
    def on_rank_zero(*args: _P.args, **kwargs: _P.kwargs) -> _Result:
        if kwargs.get("rank", 0) == 0:
            return function(*args, **kwargs)
        level = _ENGINE_LOGGER.level
        _ENGINE_LOGGER.setLevel(logging.ERROR)
        try:
            return function(*args, **kwargs)
        finally:
            _ENGINE_LOGGER.setLevel(level)

    return on_rank_zero


def _check_inputs(model: Any, batches: Any, loss_fn: Any, config: Any, rank: int, world_size: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(config, PruningConfig):
        raise TypeError(f"`config` must be a PruningConfig, got {type(config).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch) -> Tensor, got {loss_fn!r}.")
    if not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError(
            f"`calibration_batches` must be a non-empty sequence of batches, got "
            f"{type(batches).__name__}{'' if not isinstance(batches, Sequence) else ' of length 0'}. "
            "HINT: pass list(dataloader)."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank!r}.")


def _group_sizes(candidates: Sequence[Candidate], groups: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """Parameters per group."""
    numel = {c.name: c.numel for c in candidates}
    return {group: sum(numel[name] for name in names) for group, names in groups.items()}


def check_before_pruning(model: nn.Module, config: PruningConfig) -> list[str]:
    """The checks of :func:`prune` that need neither calibration data nor a forward pass: ``model`` has stacks of
    blocks in which ``include``/``exclude`` select weights; with an N:M ``structure``, every selected weight's input
    width is a multiple of M; ``allocation_report`` is a readable pruning report made for those weights (its groups
    are among them) at ``sparsity``.

    ``prune`` runs them first; a caller that loads data or evaluates the model before pruning (the Lightning
    callback) runs them before that work too, so a bad setting is refused at once.

    Returns:
        The names of the candidate weights (of every stack: those the calibration loss reaches are among them).

    Raises:
        FileNotFoundError, ValueError: as :func:`prune` does for these settings.
    """
    # The candidates of every stack: those of the stacks that run in the calibration loss are among them.
    candidates = find_candidates(model, find_stacks(model), config)
    if config.allocation_report is not None:
        groups = build_groups(candidates, config.granularity)
        report = read_allocation_report(config.allocation_report)
        check_report_fits(report, config, groups, _group_sizes(candidates, groups), complete=False)
    if config.n_m is not None:
        m = config.n_m[1]
        misfits = [c.name for c in candidates if model.get_parameter(c.name).shape[-1] % m]
        if misfits:
            shown = ", ".join(f"{name} {list(model.get_parameter(name).shape)}" for name in misfits[:3])
            more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
            raise ValueError(
                f"`structure` {config.structure} prunes groups of {m} consecutive inputs, but these weights have an "
                f"input width that is not a multiple of M={m}: {shown}{more}. HINT: leave them out with `exclude`, "
                "or prune with structure 'unstructured'."
            )
    return [candidate.name for candidate in candidates]


def _plan(
    model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, config: PruningConfig, rank: int
) -> tuple[_Plan, StageStats]:
    device = next(model.parameters()).device
    with StageMonitor(device) as monitor:
        stacks = find_stacks(model)
        first_id = rank % len(batches)
        run_first = partial(checked_loss, loss_fn, model, batches[first_id], first_id)
        ran, skipped = order_stacks(model, stacks, run_first) if stacks else ([], [])
        monitor.full_forwards += 1
        if stacks and not ran:
            raise RuntimeError(
                f"None of the stacks of blocks {[s.name for s in stacks]} ran during `loss_fn(model, batch)`. "
                "HINT: `loss_fn` must run the model's forward pass."
            )
        for stack in skipped:
            logger.warning(f"Stack {stack.name} never runs in the calibration loss; it is left dense.")
        candidates = find_candidates(model, ran, config)
    # A stack with nothing to prune (BLIP-2's excluded Q-Former) is neither replayed nor counted.
    excluded = [stack for stack in ran if not any(c.stack == stack.name for c in candidates)]
    ran = [stack for stack in ran if stack not in excluded]
    groups = build_groups(candidates, config.granularity)
    stack_of = {c.name: c.stack for c in candidates}
    towers: dict[str, list[str]] = {}
    for group, names in groups.items():
        towers.setdefault(stack_of[names[0]], []).append(group)
    plan = _Plan(
        ran,
        skipped,
        excluded,
        candidates,
        groups,
        {t: tuple(g) for t, g in towers.items()},
        _group_sizes(candidates, groups),
    )
    logger.info(
        "Found %d weight matrices, %s weights to prune in %d groups over %d stacks: %s",
        len(candidates),
        f"{sum(candidate.numel for candidate in candidates):,}",
        len(groups),
        len(ran),
        ", ".join(f"{s.name} ({len(s.blocks)})" for s in ran),
    )
    return plan, monitor.stats


def _aggregate(plan: _Plan, totals: Mapping[str, float], config: PruningConfig) -> dict[str, float]:
    """Group totals -> group scores: kept (``sum``) or divided by the group's parameter count (``avg``)."""
    if config.aggregate == "avg":
        return {group: total / plan.sizes[group] for group, total in totals.items()}
    return dict(totals)


def _score(
    model: nn.Module,
    plan: _Plan,
    batches: Sequence[Any],
    loss_fn: LossFn,
    config: PruningConfig,
    all_reduce: AllReduce | None,
    rank: int,
    world_size: int,
    progress: Progress | None,
    residency: Residency | None = None,
) -> GroupScores:
    _check_residency(plan, config, residency)
    params = dict(model.named_parameters())
    chosen = _leading_batches(batches, config.coarse_samples)
    own = _shard(chosen, rank, world_size)
    device = next(model.parameters()).device

    with StageMonitor(device) as monitor:
        request = ImportanceRequest(
            model,
            {c.name: params[c.name] for c in plan.candidates},
            plan.groups,
            own,
            loss_fn,
            config,
            monitor,
            partial(_ticker, progress, "coarse"),
            None if progress is None else partial(progress, "coarse"),
            residency,
        )
        estimator = get_importance(config.importance)
        raw = estimator.measure(request)
        if all_reduce is not None:
            keys = list(raw)
            summed = all_reduce(torch.tensor([raw[k] for k in keys], dtype=torch.float64, device=device))
            raw = dict(zip(keys, summed.tolist(), strict=True))
        scores = _aggregate(plan, estimator.combine(raw, request, len(chosen)), config)
    settings = _score_settings(config, plan, params)
    stats = replace(over_ranks(monitor.stats, all_reduce, rank, world_size, device), samples=_samples_of(chosen))
    logger.info(
        "Coarse step (%s) done in %.1f s, %d forward passes", config.importance, stats.seconds, stats.full_forwards
    )
    return GroupScores(scores, dict(plan.sizes), dict(plan.groups), dict(plan.towers), settings, stats)


def _check_residency(plan: _Plan, config: PruningConfig, residency: Residency | None) -> None:
    """Offloaded weights are resident one unit at a time: scores that need every weight at once cannot be had."""
    if residency is None or not any(residency.offloaded(c.name) for c in plan.candidates):
        return
    if config.allocation in ("owl", "auto"):
        raise ValueError(
            f"`allocation`={config.allocation!r} runs whole-model passes over resident weights, but some are "
            "offloaded (CPU or disk) and are loaded one block at a time. HINT: use allocation 'ecoflap', 'uniform' or "
            "'from_report', or place the whole model on devices."
        )
    if config.allocation == "ecoflap" and config.importance not in ("zeroth_order", "uniform"):
        raise ValueError(
            f"`importance`={config.importance!r} needs every weight at once, but some are offloaded (CPU or disk) and "
            "are loaded one block at a time. HINT: use importance='zeroth_order' (or 'uniform'), or place the whole "
            "model on devices."
        )


@_warnings_on_rank_zero
def score_groups(
    model: nn.Module,
    calibration_batches: Sequence[Any],
    loss_fn: LossFn,
    config: PruningConfig,
    *,
    all_reduce: AllReduce | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: Progress | None = None,
    residency: Residency | None = None,
) -> GroupScores:
    """Run only the coarse step: one importance score per group, reusable by ``prune(..., scores=...)`` for any
    target sparsity. The model is left exactly as it was.

    Args:
        model: as for :func:`prune`.
        calibration_batches: as for :func:`prune`; the leading batches holding ``config.coarse_samples`` are scored.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the model's own training loss.
        config: the run's configuration; ``importance`` must be an estimator, not ``"uniform"``. ``prune`` refuses
            the scores when its config differs in a field they depend on (importance, score, aggregate,
            granularity, probe_granularity, include, exclude, coarse_samples, eps, probes, seed) or the model's
            candidates differ.
        all_reduce: sums a tensor over ranks (DDP); the scores become global.
        rank: this process's rank; it handles the calibration batches with ``id % world_size == rank``.
        world_size: number of ranks.
        progress: ``progress(stage, done, total)`` callback.
        residency: for a model with offloaded weights, as for :func:`prune`.

    Returns:
        The group scores, sizes, groups and towers, the settings they depend on and the coarse step's cost.

    Raises:
        ValueError, TypeError: bad arguments, ``importance="uniform"``, no stacks, empty data.
        FloatingPointError: a NaN or infinite calibration loss (naming the batch).
    """
    _check_inputs(model, calibration_batches, loss_fn, config, rank, world_size)
    if config.importance == "uniform":
        raise ValueError(
            f"`importance` must be an estimator to score groups ({', '.join(map(repr, importance_names()))}), got "
            "'uniform'."
        )
    batch_sizes = [batch_size(batch) for batch in calibration_batches]
    _check_shards(batch_sizes, config, world_size, ("coarse",))
    _warn(_short_calibration(batch_sizes, config, ("coarse",), holdout=False))
    with pruning_session(model):
        plan, _ = _plan(model, calibration_batches, loss_fn, config, rank)
        return _score(
            model, plan, calibration_batches, loss_fn, config, all_reduce, rank, world_size, progress, residency
        )


def _score_settings(config: PruningConfig, plan: _Plan, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """What the coarse scores depend on: the scoring fields of the config and the candidates' names and shapes."""
    settings: dict[str, Any] = {name: getattr(config, name) for name in _SCORE_SETTINGS}
    settings["candidates"] = tuple(f"{c.name}:{tuple(params[c.name].shape)}" for c in plan.candidates)
    return settings


def _check_scores(scores: GroupScores, plan: _Plan, config: PruningConfig, params: dict[str, nn.Parameter]) -> None:
    settings = _score_settings(config, plan, params)
    differing = sorted(k for k, v in settings.items() if scores.settings.get(k) != v)
    if differing or scores.groups != plan.groups:
        described = [
            "candidates (another model: other weight names or shapes)"
            if k == "candidates"
            else f"{k} ({scores.settings.get(k)!r} in the scores, {settings[k]!r} now)"
            for k in differing
        ]
        raise ValueError(
            f"`scores` were computed with other settings or another model than this run: "
            f"{'; '.join(described) or 'other groups'}. HINT: compute them with score_groups() on the same model "
            "with the same config (only `sparsity`, `max_sparsity` and the fine-step settings may change)."
        )


def _read_weights(
    model: nn.Module,
    candidates: Sequence[Candidate],
    residency: Residency | None,
    read: Callable[[torch.Tensor], _Read],
) -> dict[str, _Read]:
    """``read(weight)`` for every candidate, block by block; an offloaded block is held resident while it is read
    (nothing is written back), so offloaded and resident weights are read alike."""
    by_block: dict[str, list[str]] = {}
    for candidate in candidates:
        by_block.setdefault(candidate.block, []).append(candidate.name)
    found: dict[str, _Read] = {}
    for names in by_block.values():
        offloaded = [name for name in names if residency is not None and residency.offloaded(name)]
        with resident(residency, offloaded, write_back=False):
            found.update((name, read(model.get_parameter(name).detach())) for name in names)
    return found


def _prior_zeros(model: nn.Module, candidates: Sequence[Candidate], residency: Residency | None) -> dict[str, int]:
    """Candidate weights that are exactly zero before pruning (the model was pruned before), per tensor."""
    counts = _read_weights(model, candidates, residency, lambda weight: int((weight == 0).sum()))
    return {name: count for name, count in counts.items() if count}


def _tensor_sparsity(plan: _Plan, group_sparsity: Mapping[str, float]) -> dict[str, float]:
    return {name: group_sparsity[group] for group, names in plan.groups.items() for name in names}


@_warnings_on_rank_zero
def prune(
    model: nn.Module,
    calibration_batches: Sequence[Any],
    loss_fn: LossFn,
    config: PruningConfig,
    *,
    scores: GroupScores | None = None,
    all_reduce: AllReduce | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: Progress | None = None,
    residency: Residency | None = None,
) -> PruningResult:
    """Prune ``model`` in place with ECoFLaP (per-group sparsity from ``config.allocation``, then layer-wise pruning).

    Args:
        model: any ``nn.Module`` holding stacks of transformer blocks (HF, timm or plain PyTorch).
        calibration_batches: a sequence of batches on the model's device, used as given; the coarse step takes the
            leading batches holding ``config.coarse_samples`` samples, the fine step (and OWL's dense pass)
            ``config.fine_samples``, and ``auto`` evaluates its candidates on the next batches holding
            ``config.auto_holdout_samples`` (``config.calibration_samples`` in all).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the model's own training loss; it also runs the
            forward passes of the fine step.
        config: the run's configuration.
        scores: group scores from :func:`score_groups` to reuse instead of re-scoring.
        all_reduce: sums a tensor over ranks (DDP); statistics and scores become global.
        rank: this process's rank; it handles the calibration batches with ``id % world_size == rank``.
        world_size: number of ranks.
        progress: ``progress(stage, done, total)`` callback.
        residency: for a model with offloaded weights (``ecoflap_pl.models.placement.OffloadedWeights``): both steps
            hold one unit's or block's weights resident at a time and store the pruned ones back.

    Returns:
        The result with masks, per-tensor target and achieved sparsity, scores and per-stage costs.

    Raises:
        ValueError, TypeError: bad arguments, no stacks, patterns selecting nothing, empty data.
        FloatingPointError: a NaN or infinite calibration loss (naming the batch).
        On any exception, including KeyboardInterrupt, every weight is restored bit-exactly.
    """
    _check_inputs(model, calibration_batches, loss_fn, config, rank, world_size)
    coarse = scores is None and config.scores_groups
    batch_sizes = [batch_size(batch) for batch in calibration_batches]
    check_calibration_sizes(batch_sizes, config, world_size=world_size, coarse=coarse)
    auto = config.allocation == "auto"
    holdout = [(i, calibration_batches[i]) for i in _holdout_ids(batch_sizes, config)] if auto else []
    _warn(_short_calibration(batch_sizes, config, ("coarse", "fine") if coarse else ("fine",), holdout=auto))
    check_before_pruning(model, config)
    stages: dict[str, StageStats] = {}
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    whole_run = partial(over_ranks, all_reduce=all_reduce, rank=rank, world_size=world_size, device=device)
    with pruning_session(model) as transaction:
        plan, discovery = _plan(model, calibration_batches, loss_fn, config, rank)
        stages["discovery"] = whole_run(discovery)
        _check_residency(plan, config, residency)
        prior_zeros = _prior_zeros(model, plan.candidates, residency)
        prior_sparsity = sum(prior_zeros.values()) / max(sum(c.numel for c in plan.candidates), 1)
        if prior_sparsity >= _PRIOR_SPARSITY_WARNING:
            logger.warning(
                f"{100 * prior_sparsity:.1f}% of the candidate weights are already zero before pruning (a model pruned "
                "before, or dequantised). They stay pruned: the masks and the achieved sparsity include them.",
            )
        fine_leading = _leading_batches(calibration_batches, config.fine_samples)
        fine_batches = _shard(fine_leading, rank, world_size)
        computed: dict[str, GroupScores] = {}
        outliers: dict[float, dict[str, float]] = {}

        def coarse_scores() -> GroupScores:
            if "scores" not in computed:
                if scores is None:
                    computed["scores"] = _score(
                        model,
                        plan,
                        calibration_batches,
                        loss_fn,
                        config,
                        all_reduce,
                        rank,
                        world_size,
                        progress,
                        residency,
                    )
                else:
                    _check_scores(scores, plan, config, params)
                    computed["scores"] = scores
                stages["coarse"] = computed["scores"].stats
            return computed["scores"]

        def outlier_ratios(m: float) -> dict[str, float]:
            if m not in outliers:
                with StageMonitor(device) as monitor, torch.no_grad():
                    outliers[m] = dense_outlier_ratios(
                        model,
                        plan.stacks,
                        plan.candidates,
                        plan.groups,
                        fine_batches,
                        loss_fn,
                        config,
                        m,
                        monitor=monitor,
                        all_reduce=all_reduce,
                    )
                stages["outliers"] = _add(stages.get("outliers"), whole_run(monitor.stats))
            return outliers[m]

        def evaluate(name: str, group_sparsity: Mapping[str, float]) -> float:
            # Wanda stands in for SparseGPT: the candidates differ in their allocation, not in the local pruner.
            search = replace(config, method="wanda", comparison="per_row") if config.method == "sparsegpt" else config
            trial = WeightTransaction()
            with StageMonitor(device) as monitor, torch.no_grad():
                try:
                    fine_prune_(
                        model,
                        plan.stacks,
                        plan.candidates,
                        _tensor_sparsity(plan, group_sparsity),
                        fine_batches,
                        loss_fn,
                        search,
                        transaction=trial,
                        monitor=monitor,
                        all_reduce=all_reduce,
                        on_block_done=_ticker(progress, f"auto: {name}", _block_count(plan)),
                    )
                    loss = _heldout_loss(model, holdout, loss_fn, all_reduce, rank, world_size, monitor)
                finally:
                    trial.rollback()
            stages["auto"] = _add(stages.get("auto"), whole_run(monitor.stats))
            return loss

        request = AllocationRequest(
            config, plan.sizes, plan.groups, plan.towers, coarse_scores, outlier_ratios, evaluate
        )
        allocation = get_allocation(config.allocation)(request)
        if "auto" in stages:
            stages["auto"] = replace(stages["auto"], samples=_samples_of(holdout))
        group_sparsity = allocation.group_sparsity
        tensor_sparsity = _tensor_sparsity(plan, group_sparsity)
        with StageMonitor(device) as monitor, torch.no_grad():
            masks = fine_prune_(
                model,
                plan.stacks,
                plan.candidates,
                tensor_sparsity,
                fine_batches,
                loss_fn,
                config,
                transaction=transaction,
                monitor=monitor,
                all_reduce=all_reduce,
                on_block_done=_ticker(progress, "fine", _block_count(plan)),
                residency=residency,
            )
        stages["fine"] = replace(whole_run(monitor.stats), samples=_samples_of(fine_leading))
        # weights that were zero already are pruned too, whatever the new mask says
        pruned_before = [c for c in plan.candidates if c.name in prior_zeros]
        for name, nonzero in _read_weights(model, pruned_before, residency, lambda weight: weight != 0).items():
            masks[name] = masks[name] & nonzero.to(masks[name].device)
    sizes = {c.name: c.numel for c in plan.candidates}
    achieved = {name: 1.0 - float(mask.sum()) / mask.numel() for name, mask in masks.items()}
    result = PruningResult(
        config=config,
        groups=plan.groups,
        towers=plan.towers,
        group_scores=dict(computed["scores"].scores) if "scores" in computed else {},
        group_sparsity=group_sparsity,
        target_sparsity=tensor_sparsity,
        achieved_sparsity=achieved,
        sizes=sizes,
        stages=stages,
        masks=masks,
        skipped_stacks=tuple(stack.name for stack in plan.skipped),
        excluded_stacks=tuple(stack.name for stack in plan.excluded),
        prior_sparsity=prior_sparsity,
        group_outlier_ratios=outliers.get(config.owl_m, {}),
        candidates=allocation.candidates,
        chosen_candidate=allocation.chosen,
    )
    logger.info(
        "Pruned %d weight matrices to %.2f%% sparsity of their %s weights (target %.2f%%) in %.1f s",
        len(masks),
        100 * result.overall_sparsity,
        f"{sum(sizes.values()):,}",
        100 * config.sparsity,
        sum(s.seconds for s in stages.values()),
    )
    return result
