"""The Gemma benchmark's report (``benchmarks/gemma_lm.py``): the paired-by-seed table and the `auto` picks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gemma_lm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gemma_lm

    return gemma_lm


def _run(gemma_lm, tool: str, method: str, sparsity: float, seed: int, perplexity: float, chosen: str = ""):
    return gemma_lm.Run(tool, method, sparsity, seed, perplexity, chosen=chosen)


def test_paired_table_compares_only_the_seeds_both_ran_and_leaves_out_baselines_never_run(gemma_lm) -> None:
    runs = [
        _run(gemma_lm, "ecoflap-pl", "auto_sparsegpt", 0.7, 0, 100.0),
        _run(gemma_lm, "ecoflap-pl", "auto_sparsegpt", 0.7, 1, 120.0),
        _run(gemma_lm, "ecoflap-pl", "auto_sparsegpt", 0.7, 2, 90.0),  # no baseline on seed 2
        _run(gemma_lm, "llm-compressor", "sparsegpt", 0.7, 0, 125.0),
        _run(gemma_lm, "llm-compressor", "sparsegpt", 0.7, 1, 96.0),
        _run(gemma_lm, "llm-compressor", "sparsegpt", 0.6, 0, 80.0),  # no recommended run at 60%
    ]
    lines = gemma_lm.paired_table(runs, [0.6, 0.7])
    row = next(line for line in lines if line.startswith("| llm-compressor sparsegpt |"))
    ratio = math.sqrt((100.0 / 125.0) * (120.0 / 96.0))  # geometric mean of 0.8 and 1.25: exactly 1
    assert row == f"| llm-compressor sparsegpt | not run | 1/2, ×{ratio:.3f} |"
    assert not any(line.startswith("| ecoflap-pl wanda") for line in lines)  # never run beside it


def test_auto_picks_are_counted_per_method_and_sparsity(gemma_lm) -> None:
    runs = [
        _run(gemma_lm, "ecoflap-pl", "auto_sparsegpt", 0.7, seed, 100.0, chosen)
        for seed, chosen in enumerate(["uniform", "ecoflap(max_sparsity=0.8)", "uniform"])
    ] + [_run(gemma_lm, "ecoflap-pl", "auto_sparsegpt", 0.5, 0, 40.0, "owl(lambda=0.08)")]
    args = gemma_lm.parse_args(["--report-only"])
    text = gemma_lm.table(runs, args)
    assert (
        "Candidates chosen by `auto`: auto_sparsegpt 50% (n=1): owl(lambda=0.08) 1x; "
        "auto_sparsegpt 70% (n=3): ecoflap(max_sparsity=0.8) 1x, uniform 2x."
    ) in text


def test_a_report_from_a_file_without_runs_is_refused_and_writes_nothing(gemma_lm, tmp_path) -> None:
    results = tmp_path / "results.md"  # stands in for benchmarks/RESULTS.md
    results.write_text("# Benchmark results\n\n## Gemma-3-270M perplexity (real pretrained weights)\n\nkept\n")
    before = results.read_text()
    with pytest.raises(SystemExit, match="HINT: check --json"):
        gemma_lm.main(["--report-only", "--json", str(tmp_path / "typo.jsonl"), "--write", str(results)])
    assert results.read_text() == before
