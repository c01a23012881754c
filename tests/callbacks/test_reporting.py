"""The report of a pruning run: rich table, JSON (loads back as a PruningResult) and the per-block plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from ecoflap_pl import PruningConfig, PruningResult, prune
from ecoflap_pl.callbacks.progress import StageProgress
from ecoflap_pl.export.model_card import _towers
from ecoflap_pl.reporting import (
    block_rows,
    candidate_table,
    plot_sparsity,
    render_table,
    sparsity_notes,
    write_report,
)
from tests.callbacks.callback_toys import ToyData, ToyTask


@pytest.fixture(scope="module")
def result() -> PruningResult:
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(16))
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=16)
    return prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)


def test_block_rows_cover_both_towers_in_order(result: PruningResult) -> None:
    rows = block_rows(result)
    assert [(r.tower, r.block, r.index) for r in rows] == [
        ("vision", "vision.0", 0),
        ("vision", "vision.1", 1),
        ("text", "text.0", 0),
        ("text", "text.1", 1),
    ]
    total = sum(r.params for r in rows)
    assert total == sum(result.sizes.values())
    assert sum(r.achieved * r.params for r in rows) / total == pytest.approx(result.overall_sparsity)
    assert all(r.score == pytest.approx(result.group_scores[r.block]) for r in rows)


def test_render_table_shows_blocks_towers_totals_and_stage_costs(result: PruningResult) -> None:
    console = Console(width=160, record=True)
    console.print(render_table(result))
    text = console.export_text()
    for expected in ("vision.0", "text.1", "vision (tower)", "text (tower)", "total", "coarse", "fine", "discovery"):
        assert expected in text
    assert f"{100 * result.overall_sparsity:.2f}%" in text


def test_write_report_json_loads_back_and_plot_is_a_png(result: PruningResult, tmp_path: Path) -> None:
    paths = write_report(result, tmp_path / "report", {"note": "test"})
    data = json.loads(paths["json"].read_text())
    assert data["metadata"] == {"report_version": 1, "note": "test"}
    assert len(data["blocks"]) == 4
    again = PruningResult.from_dict(data)
    assert again.achieved_sparsity == result.achieved_sparsity and again.config == result.config
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_handles_uniform_runs_without_scores(tmp_path: Path) -> None:
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(8))
    uniform = prune(
        task.model, batches, lambda m, b: task.calibration_loss(b), PruningConfig(importance="uniform", fine_samples=8)
    )
    assert all(row.score is None for row in block_rows(uniform))
    assert plot_sparsity(uniform, tmp_path / "u.png").stat().st_size > 0
    assert torch.is_tensor(next(iter(uniform.masks.values())))


def test_block_rows_stay_apart_on_an_80_column_terminal_with_hub_length_module_names() -> None:
    """The demo BLIP-2's towers are ``vision_model.encoder.layers`` and ``language_model.model.decoder.layers``: the
    table gave each language block as ``language_model.model.decoder.laye…``, both rows alike."""
    task = ToyTask()
    nested = nn.Module()  # the toy's towers under the module path of a Hugging Face BLIP-2 OPT
    nested.language_model = nn.Module()
    nested.language_model.model = nn.Module()
    nested.language_model.model.decoder = task.model
    batches = list(ToyData().calibration_dataloader(8))
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8)
    result = prune(nested, batches, lambda model, batch: task.calibration_loss(batch), config)
    console = Console(width=80, record=True)
    console.print(render_table(result))
    lines = console.export_text().splitlines()
    block_lines = [line for line in lines if line.startswith("│   ")]
    labels = [line.split("│")[1].strip() for line in block_lines]
    assert labels == ["vision.0", "vision.1", "text.0", "text.1"]
    assert "…" not in console.export_text()
    assert any("language_model.model.decoder.vision" in line for line in lines)  # the tower row names the full path


def test_a_block_after_one_left_out_by_exclude_keeps_its_index(tmp_path: Path) -> None:
    """With ``vision.0`` excluded, ``vision.1`` was block 0 of its tower in the report's ``blocks`` and on the plot's
    x axis ("block index within tower") (CASES 236)."""
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(8))
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8, exclude=("vision.0.*",))
    result = prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)
    rows = block_rows(result)
    assert [(r.block, r.index) for r in rows] == [("vision.1", 1), ("text.0", 0), ("text.1", 1)]
    data = json.loads(write_report(result, tmp_path)["json"].read_text())
    assert [(b["block"], b["index"]) for b in data["blocks"]] == [("vision.1", 1), ("text.0", 0), ("text.1", 1)]


def test_the_tables_say_what_their_counts_and_percentages_are_of(result: PruningResult) -> None:
    """The sparsity table's "params" column and "total" row counted the candidate weights only (the demo ViT's
    262,144 of its 366,346 parameters), without a word, and the stage table's "forwards" counted calls of the
    calibration loss, many stopped early (CASES 237)."""
    console = Console(width=160, record=True)
    console.print(render_table(result))
    text = console.export_text()
    lines = [line.rstrip() for line in text.splitlines()]
    assert "params" not in text
    assert (
        "weights: the candidate weights (the Linear weights of the blocks), not all parameters; target, achieved: "
        "the share of them that is zero" in lines
    )
    assert not any("exclude" in line for line in lines)  # the default patterns left nothing of this model out
    assert "forwards: calls of the calibration loss" in text and "block fwd: blocks run on their own" in text
    assert "ranks" not in text  # one process
    total = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("total") and "%" in line)
    assert f"{sum(result.sizes.values()):,}" in total


def test_an_n_m_run_names_its_structure_in_the_title() -> None:
    """A 2:4 run's table was titled "uniform + wanda, target 50.00%", as an unstructured run at 50%."""
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(8))
    config = PruningConfig(
        importance="uniform", allocation="uniform", structure="2:4", max_sparsity=None, fine_samples=8
    )
    result = prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)
    console = Console(width=160, record=True)
    console.print(render_table(result))
    assert "ECoFLaP: uniform + wanda 2:4, target 50.00%" in console.export_text()


def test_auto_s_candidates_keep_their_names_whole_on_an_80_column_terminal() -> None:
    """The names were cut to "ecoflap(max_sparsity…", three rows alike: which cap each row tried was not shown
    (CASES 241)."""
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(16))
    config = PruningConfig(sparsity=0.6, allocation="auto", coarse_samples=4, fine_samples=4, auto_holdout_samples=4)
    result = prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)
    console = Console(width=80, record=True)
    console.print(candidate_table(result))
    text = console.export_text()
    assert "…" not in text
    for candidate in result.candidates:
        assert f"│ {candidate.name} " in text, candidate.name
    assert "min group" in text and "max group" in text  # the allocation's range, not the `max_sparsity` setting


def test_the_notes_name_the_stacks_exclude_left_dense_and_the_ranks_of_a_ddp_run() -> None:
    """The default `exclude` patterns were named under every table ("not pruned nor counted (`exclude`): *qformer*"
    for a ViT, which has no Q-Former), the notes were the tables' captions, wrapped to the table's width, and a
    one-process run was told its counts were "summed over all ranks"."""
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(8))
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8, exclude=("vision.*",))
    result = prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)
    assert result.excluded_stacks == ("vision",)
    assert PruningResult.from_dict(result.to_dict()).excluded_stacks == ("vision",)
    assert "Left dense by `exclude` (`vision.*`) or `include`: `vision`." in _towers(result)  # the model card's
    console = Console(width=160, record=True)
    console.print(render_table(result, world_size=2))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert "left dense by `exclude` (vision.*) or `include`: vision" in lines
    assert (
        "counts summed over the 2 ranks; seconds (wall time) and peak memory (of one process): the largest rank's"
        in lines
    )


def test_stacks_left_dense_by_include_alone_name_no_empty_exclude() -> None:
    """With `exclude` empty and `include` leaving a stack out, the notes read "left dense by `exclude` () or
    `include`"."""
    task = ToyTask()
    batches = list(ToyData().calibration_dataloader(8))
    config = PruningConfig(sparsity=0.5, coarse_samples=8, fine_samples=8, include=("text.*",), exclude=())
    result = prune(task.model, batches, lambda model, batch: task.calibration_loss(batch), config)
    assert result.excluded_stacks == ("vision",)
    assert "left dense by `include`: vision" in sparsity_notes(result)
    assert "Left dense by `include`: `vision`." in _towers(result)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_coarse_bar_says_when_it_counts_one_rank_s_share(
    capsys: pytest.CaptureFixture[str], world_size: int
) -> None:
    """Under DDP each rank scores its share of the calibration batches and only rank 0 shows the bars: the coarse
    bar's count is that share (the stage table sums the ranks); the fine step's blocks are every rank's."""
    with StageProgress(world_size=world_size) as progress:
        progress("coarse", 3, 3)
        progress("fine", 2, 2)

    lines = capsys.readouterr().out.splitlines()
    coarse = next(line for line in lines if "ECoFLaP coarse" in line)
    fine = next(line for line in lines if "ECoFLaP fine" in line)
    assert ("rank 0's share of 2 ranks" in coarse) == (world_size == 2)
    assert "3/3" in coarse and "2/2" in fine and "rank" not in fine
