"""Rendering a :class:`~ecoflap_pl.pruning.PruningResult`: a rich table, a JSON report and a per-block sparsity plot.

Shared by the pruning callback and the CLI. Nothing here prunes; it only reads a result (or its ``to_dict()``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ecoflap_pl.pruning import PruningResult

logger = logging.getLogger(__name__)

REPORT_JSON = "pruning_report.json"
REPORT_PLOT = "pruning_sparsity.png"
REPORT_VERSION = 1


@dataclass(frozen=True)
class BlockRow:
    """One transformer block of one tower: its candidate weights taken together.

    Attributes:
        tower: the stack the block belongs to (e.g. ``"vision_model.encoder.layers"``).
        block: the block's module name (e.g. ``"vision_model.encoder.layers.3"``).
        index: the block's position inside its tower: its index in the stack (a block left out by ``exclude`` keeps
            its place), or its place among the blocks listed where the stack names its entries (an
            ``nn.Sequential`` built from a dict).
        params: number of candidate weights in the block.
        target: size-weighted target sparsity of its weights.
        achieved: fraction of its candidate weights that are zero-masked.
        score: the coarse score of the block (summed over its groups; ``None`` with ``granularity="model"`` or
            ``importance="uniform"``).
    """

    tower: str
    block: str
    index: int
    params: int
    target: float
    achieved: float
    score: float | None


def _block_of(tower: str, name: str) -> str:
    """``"layers.3.fc1.weight"`` in tower ``"layers"`` -> ``"layers.3"`` (a root-level stack has tower ``""``)."""
    rest = name[len(tower) + 1 :] if tower else name
    head = rest.split(".", 1)[0]
    return f"{tower}.{head}" if tower else head


def _position(tower: str, block: str, listed: int) -> int:
    """The index of ``block`` in its stack, from its name (``"layers.3"`` -> 3); ``listed``, its place among the
    blocks listed, for a stack whose entries have names of their own."""
    entry = block[len(tower) + 1 :] if tower else block
    return int(entry) if entry.isdigit() else listed


def block_rows(result: PruningResult) -> list[BlockRow]:
    """Per-block totals of ``result``, tower by tower in forward order, blocks in model order."""
    rows: list[BlockRow] = []
    for tower, groups in result.towers.items():
        members: dict[str, list[str]] = {}
        block_groups: dict[str, list[str]] = {}
        for group in groups:
            for name in result.groups[group]:
                block = _block_of(tower, name)
                members.setdefault(block, []).append(name)
                if group not in block_groups.setdefault(block, []):
                    block_groups[block].append(group)
        for index, (block, names) in enumerate(members.items()):
            params = sum(result.sizes[n] for n in names)
            target = sum(result.target_sparsity[n] * result.sizes[n] for n in names) / params
            achieved = sum(result.achieved_sparsity[n] * result.sizes[n] for n in names) / params
            whole = result.config.granularity != "model" and result.group_scores
            score = sum(result.group_scores[g] for g in block_groups[block]) if whole else None
            rows.append(BlockRow(tower, block, _position(tower, block, index), params, target, achieved, score))
    return rows


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _block_label(row: BlockRow) -> str:
    """The block's name below its tower's row: the tower's last part and the rest (``"layers.3"`` for
    ``"language_model.model.decoder.layers.3"``), short enough for an 80-column terminal; the report keeps the full
    name."""
    if not row.tower:
        return row.block
    return row.tower.rpartition(".")[2] + row.block[len(row.tower) :]


def _tower_totals(rows: list[BlockRow], tower: str) -> tuple[int, float]:
    params = sum(row.params for row in rows if row.tower == tower)
    target = sum(row.target * row.params for row in rows if row.tower == tower) / params
    return params, target


def allocation_label(result: PruningResult) -> str:
    """``"zeroth_order"`` for the paper's rule (as before allocations had names), else the allocation's name."""
    config = result.config
    if config.allocation == "ecoflap":
        return config.importance
    if result.chosen_candidate is not None:
        return f"auto -> {result.chosen_candidate}"
    return config.allocation


def _method_label(result: PruningResult) -> str:
    """The fine step's method, with its N:M structure where it has one (``"wanda 2:4"``)."""
    config = result.config
    return config.method if config.structure == "unstructured" else f"{config.method} {config.structure}"


def sparsity_table(result: PruningResult) -> Table:
    """Per block and per tower: candidate weights, coarse score, target and achieved sparsity; the overall total last.

    The counts and percentages are of the candidate weights alone (the Linear weights of the blocks that pruning
    considered), not of all the model's parameters: :func:`sparsity_notes` says so below the table."""
    config = result.config
    table = Table(
        title=f"ECoFLaP: {allocation_label(result)} + {_method_label(result)}, target {_pct(config.sparsity)}",
        title_justify="left",
    )
    # A long module name is folded onto the next line, never cut: its end (the block index) tells the rows apart.
    table.add_column("tower / block", overflow="fold")
    table.add_column("weights", justify="right")
    table.add_column("score", justify="right")
    table.add_column("target", justify="right")
    table.add_column("achieved", justify="right")
    rows = block_rows(result)
    towers = result.tower_sparsity()
    for tower in result.towers:
        for row in (r for r in rows if r.tower == tower):
            score = "-" if row.score is None else f"{row.score:.4g}"
            table.add_row(f"  {_block_label(row)}", f"{row.params:,}", score, _pct(row.target), _pct(row.achieved))
        params, target = _tower_totals(rows, tower)
        table.add_row(
            f"{tower or '<root>'} (tower)", f"{params:,}", "", _pct(target), _pct(towers[tower]), style="bold"
        )
        table.add_section()
    total = sum(result.sizes.values())
    overall_target = sum(result.target_sparsity[n] * result.sizes[n] for n in result.sizes) / total if total else 0.0
    table.add_row("total", f"{total:,}", "", _pct(overall_target), _pct(result.overall_sparsity), style="bold")
    return table


def sparsity_notes(result: PruningResult) -> list[str]:
    """What the sparsity table's counts are of, and what it leaves out: the stacks left dense (by ``include`` /
    ``exclude``, or never run by the calibration loss) and the zeros the model had before the run."""
    notes = [
        "weights: the candidate weights (the Linear weights of the blocks), not all parameters; target, achieved: the "
        "share of them that is zero"
    ]
    if result.excluded_stacks:
        notes.append(f"left dense by {excluded_by(result)}: {', '.join(result.excluded_stacks)}")
    if result.skipped_stacks:
        notes.append(f"left dense (never ran in the calibration loss): {', '.join(result.skipped_stacks)}")
    if result.prior_sparsity:
        notes.append(f"{_pct(result.prior_sparsity)} of the candidate weights were already zero before this run")
    return notes


def excluded_by(result: PruningResult, quote: str = "") -> str:
    """The settings that left ``result.excluded_stacks`` without a candidate weight: ``exclude`` with its patterns
    (each between ``quote``) or ``include``; ``include`` alone where ``exclude`` is empty."""
    patterns = ", ".join(f"{quote}{pattern}{quote}" for pattern in result.config.exclude)
    return f"`exclude` ({patterns}) or `include`" if patterns else "`include`"


def stage_table(result: PruningResult) -> Table:
    """Cost of each stage: forward and backward passes, wall time and peak memory; :func:`stage_notes` says what each
    column counts."""
    table = Table(title="Pruning cost per stage", title_justify="left")
    for column in ("stage", "forwards", "block fwd", "backwards", "seconds", "peak memory"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, stats in result.stages.items():
        kind = {"cpu_rss": "RSS", "cuda_allocated": "CUDA"}.get(stats.memory_kind, stats.memory_kind)
        memory = f"{stats.peak_memory_bytes / 2**20:,.1f} MiB {kind}"
        table.add_row(
            stage,
            str(stats.full_forwards),
            str(stats.block_forwards),
            str(stats.backward_passes),
            f"{stats.seconds:.2f}",
            memory,
        )
    table.add_row("total", "", "", "", f"{sum(s.seconds for s in result.stages.values()):.2f}", "", style="bold")
    return table


def stage_notes(world_size: int = 1) -> list[str]:
    """What the stage table's columns count; under DDP (``world_size`` > 1), whose figures they are."""
    notes = [
        "forwards: calls of the calibration loss (some stopped early, or answered in part from recorded block "
        "outputs); block fwd: blocks run on their own"
    ]
    if world_size > 1:
        notes.append(
            f"counts summed over the {world_size} ranks; seconds (wall time) and peak memory (of one process): the "
            "largest rank's"
        )
    return notes


def candidate_table(result: PruningResult) -> Table:
    """``auto``'s candidates in the order tried: held-out loss, range of group sparsities, the chosen one marked."""
    table = Table(title="auto: candidate allocations", title_justify="left")
    # The names tell the candidates apart by their end ("ecoflap(max_sparsity=0.7)"): never cut, the numbers wrap.
    longest = max((len(candidate.name) for candidate in result.candidates), default=0)
    table.add_column("candidate", no_wrap=True, min_width=longest)
    for column in ("held-out loss", "min group sparsity", "max group sparsity", "chosen"):
        table.add_column(column, justify="right")
    for candidate in result.candidates:
        values = candidate.group_sparsity.values()
        chosen = "*" if candidate.name == result.chosen_candidate else ""
        style = "bold" if chosen else None
        row = (candidate.name, f"{candidate.heldout_loss:.6g}", _pct(min(values)), _pct(max(values)), chosen)
        table.add_row(*row, style=style)
    return table


def render_table(result: PruningResult, world_size: int = 1) -> Table:
    """The summary of a run: :func:`sparsity_table`, ``auto``'s :func:`candidate_table` when it searched, and
    :func:`stage_table` (of ``world_size`` ranks), each followed by its notes, one a line, as one rich renderable.

    The notes are lines of their own, not the tables' captions, which rich wraps to the width of the table."""
    grid = Table.grid(padding=(0, 0))
    grid.add_column()
    sections: list[tuple[Table, list[str]]] = [(sparsity_table(result), sparsity_notes(result))]
    if result.candidates:
        cost = result.search_cost_ratio
        notes = [] if cost is None else [f"time: {cost:.2f}x a plain run (discovery, coarse and fine steps)"]
        sections.append((candidate_table(result), notes))
    sections.append((stage_table(result), stage_notes(world_size)))
    for index, (table, notes) in enumerate(sections):
        if index:
            grid.add_row("")
        grid.add_row(table)
        for note in notes:
            grid.add_row(Text(note))
    return grid


def report_dict(result: PruningResult, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``result.to_dict()`` plus per-block rows and ``metadata``; loads back with ``PruningResult.from_dict``."""
    data = result.to_dict()
    data["blocks"] = [row.__dict__.copy() for row in block_rows(result)]
    data["metadata"] = {"report_version": REPORT_VERSION, **dict(metadata or {})}
    return data


def plot_sparsity(result: PruningResult, path: str | Path) -> Path:
    """Draw achieved sparsity per block, one line per tower (vision vs language, as in the paper's Figure 6).

    The x axis is the block's position inside its tower; dashed lines mark the target and ``max_sparsity``.
    Uses matplotlib's object API with the Agg canvas, so no global pyplot state or display is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    rows = block_rows(result)
    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for tower in result.towers:
        points = [(row.index, 100 * row.achieved) for row in rows if row.tower == tower]
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=tower or "<root>")
    config = result.config
    axes.axhline(100 * config.sparsity, color="grey", linestyle="--", linewidth=1, label="target")
    if config.max_sparsity is not None and config.allocation == "ecoflap":
        axes.axhline(100 * config.max_sparsity, color="grey", linestyle=":", linewidth=1, label="max_sparsity")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block index within tower")
    axes.set_ylabel("sparsity (%)")
    axes.set_title(
        f"Per-block sparsity ({allocation_label(result)}, {_method_label(result)}, {100 * config.sparsity:g}% target)"
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_report(
    result: PruningResult, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``pruning_report.json`` (:func:`report_dict`) and ``pruning_sparsity.png`` (:func:`plot_sparsity`).

    Each file is replaced whole: an interrupted or failed write leaves the previous report as it was.

    Returns:
        ``{"json": path, "plot": path}``.

    Raises:
        OSError: the folder cannot be written (disk full, no permission, a file in the way), naming the folder.
    """
    directory = Path(directory)
    json_path, plot_path = directory / REPORT_JSON, directory / REPORT_PLOT
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Both files are written in full beside the old ones, then renamed over them (the JSON last), so that an
        # interrupted or failed write leaves the previous report whole, never a cut JSON or a plot of another run.
        with tempfile.TemporaryDirectory(prefix=".pruning-report-", dir=directory) as scratch:
            new_json, new_plot = Path(scratch) / REPORT_JSON, Path(scratch) / REPORT_PLOT
            new_json.write_text(json.dumps(report_dict(result, metadata), indent=2, sort_keys=False))
            plot_sparsity(result, new_plot)
            os.replace(new_plot, plot_path)
            os.replace(new_json, json_path)
    except OSError as error:
        raise OSError(
            error.errno,
            f"The pruning report could not be written to {directory}: {error.strerror or error}. HINT: free space "
            "or fix the permissions there, or set `pruning.report_dir` to another folder.",
        ) from error
    logger.debug("Pruning report written to %s and %s", json_path, plot_path)
    return {"json": json_path, "plot": plot_path}
