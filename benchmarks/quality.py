"""Quality of ECoFLaP against the baselines on the demo tasks: metric, pruning time and peak memory per method.

For each demo config (BLIP-2 VQA accuracy, BLIP-2 captioning CIDEr, ViT ImageNet-layout top-1) the task, the
DataModule and its trained demo model are built once through the ``ecoflap`` parser; then, for every method, target
sparsity and seed, the dense weights are restored, the ``ECoFLaPPruning`` callback prunes through
``Trainer.validate`` (the path users run) and the validation metric is recorded. Seeds vary the calibration subset
(``calibration_seed``) and the zeroth-order directions (``seed``); magnitude pruning uses no data and runs once.

Usage::

    python benchmarks/quality.py --write benchmarks/RESULTS.md --plot benchmarks/quality.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _results import write_section

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.cli import build_cli
from ecoflap_pl.datamodules import EcoflapDataModule
from ecoflap_pl.tasks.base import EcoflapTask

logger = logging.getLogger("quality")
SECTION = "## Quality on the demo tasks"
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"importance": "uniform", "method": "magnitude"},
    "wanda": {"importance": "uniform", "method": "wanda"},
    "sparsegpt": {"importance": "uniform", "method": "sparsegpt"},
    "ecoflap_zo_wanda": {"importance": "zeroth_order", "method": "wanda"},
    "ecoflap_fo_wanda": {"importance": "first_order", "score": "grad_mag_abs", "method": "wanda"},
    "ecoflap_zo_sparsegpt": {"importance": "zeroth_order", "method": "sparsegpt"},
    "owl_wanda": {"importance": "uniform", "allocation": "owl", "method": "wanda"},
    "owl_sparsegpt": {"importance": "uniform", "allocation": "owl", "method": "sparsegpt"},
    "auto_wanda": {"importance": "first_order", "score": "grad_mag_abs", "allocation": "auto", "method": "wanda"},
    "auto_sparsegpt": {
        "importance": "first_order",
        "score": "grad_mag_abs",
        "allocation": "auto",
        "method": "sparsegpt",
    },
}
DETERMINISTIC = {"magnitude"}
TASKS = {
    "vqa": ("configs/demo/blip2_vqa.yaml", "val/accuracy"),
    "caption": ("configs/demo/blip2_caption.yaml", "val/cider"),
    "imagenet": ("configs/demo/vit_imagenet.yaml", "val/top1"),
}


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    sparsity: float
    seed: int
    metric: float
    achieved_sparsity: float
    prune_seconds: float
    peak_memory_mib: float
    chosen: str = ""


def build(config: str) -> tuple[EcoflapTask, EcoflapDataModule]:
    """The task and DataModule of a demo config, built (and their demo data/model cached) by the ecoflap parser."""
    cli = build_cli(["-c", config, "--trainer.logger=false"], run=False, save_config_callback=None)
    return cli.model, cli.datamodule


def evaluate(
    task: EcoflapTask, data: EcoflapDataModule, metric: str, args: argparse.Namespace, pruning: ECoFLaPPruning | None
) -> float:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=args.val_batches,
        callbacks=[pruning] if pruning is not None else [],
        default_root_dir=args.workdir,
    )
    (metrics,) = trainer.validate(task, datamodule=data, verbose=False)
    return float(metrics[metric])


def sweep(name: str, args: argparse.Namespace) -> list[Run]:
    config, metric = args.configs.get(name, TASKS[name][0]), TASKS[name][1]
    task, data = build(config)
    dense_state = {key: value.detach().clone() for key, value in task.state_dict().items()}
    runs = [Run(name, "dense", 0.0, 0, evaluate(task, data, metric, args, None), 0.0, 0.0, 0.0)]
    logger.info("%s dense: %s = %.4f", name, metric, runs[0].metric)
    for method in args.methods:
        settings = METHODS[method]
        for sparsity in args.sparsities:
            for seed in args.seeds[:1] if method in DETERMINISTIC else args.seeds:
                task.load_state_dict(dense_state)
                data.calibration_seed = seed
                pl.seed_everything(seed, verbose=False)
                pruning = ECoFLaPPruning(
                    sparsity=sparsity,
                    coarse_samples=args.coarse_samples,
                    fine_samples=args.fine_samples,
                    seed=seed,
                    stages=["validate"],
                    report_dir=args.workdir,
                    progress=False,
                    **settings,
                )
                value = evaluate(task, data, metric, args, pruning)
                result = pruning.result
                assert result is not None
                peak = max(stats.peak_memory_bytes for stats in result.stages.values())
                seconds = sum(stats.seconds for stats in result.stages.values())
                runs.append(
                    Run(
                        name,
                        method,
                        sparsity,
                        seed,
                        value,
                        result.overall_sparsity,
                        seconds,
                        peak / 2**20,
                        result.chosen_candidate or "",
                    )
                )
                logger.info(
                    "%s %s %.0f%% seed %d: %s = %.4f (%.1f s)",
                    name,
                    method,
                    100 * sparsity,
                    seed,
                    metric,
                    value,
                    seconds,
                )
    task.load_state_dict(dense_state)
    return runs


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[Run], args: argparse.Namespace) -> str:
    lines = []
    for name, (default_config, metric) in TASKS.items():
        config = args.configs.get(name, default_config)
        task_runs = [run for run in runs if run.task == name]
        if not task_runs:
            continue
        dense = next(run.metric for run in task_runs if run.method == "dense")
        header = " | ".join(f"{100 * s:.0f}%" for s in args.sparsities)
        lines += [
            f"**{name}** (`{config}`, `{metric}`; dense {dense:.3f})",
            "",
            f"| method | {header} | prune s | peak MiB |",
            "|---|" + "---|" * len(args.sparsities) + "---|---|",
        ]
        for method in args.methods:
            cells = []
            for sparsity in args.sparsities:
                values = [r.metric for r in task_runs if r.method == method and r.sparsity == sparsity]
                cells.append(_mean_spread(values) if values else "")
            chosen = [r for r in task_runs if r.method == method]
            seconds = statistics.mean(r.prune_seconds for r in chosen)
            peak = max(r.peak_memory_mib for r in chosen)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.1f} | {peak:.0f} |")
        picks = [f"{r.method} {100 * r.sparsity:.0f}% seed {r.seed}: {r.chosen}" for r in task_runs if r.chosen]
        if picks:
            lines += ["", "Candidates chosen by `auto`: " + "; ".join(picks)]
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[Run], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in TASKS if any(run.task == name for run in runs)]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        task_runs = [run for run in runs if run.task == name]
        dense = next(run.metric for run in task_runs if run.method == "dense")
        axis.axhline(dense, color="black", linestyle=":", label="dense")
        for method in args.methods:
            means, spreads = [], []
            for sparsity in args.sparsities:
                values = [r.metric for r in task_runs if r.method == method and r.sparsity == sparsity]
                means.append(statistics.mean(values))
                spreads.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            xs = [100 * s for s in args.sparsities]
            axis.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=method)
        axis.set_title(f"{name}: {TASKS[name][1]}")
        axis.set_xlabel("sparsity (%)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="TASK=YAML",
        help="evaluate a task with another ecoflap config (same metric), e.g. vqa=configs/experiments/x.yaml",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--coarse-samples", type=int, default=32)
    parser.add_argument("--fine-samples", type=int, default=64)
    parser.add_argument("--val-batches", type=float, default=1.0, help="Trainer limit_val_batches")
    parser.add_argument("--workdir", default="runs/quality")
    parser.add_argument("--write", default=None, help="markdown file whose quality section is (re)written")
    parser.add_argument("--plot", default=None, help="PNG of metric against sparsity per method")
    parser.add_argument("--json", default=None, help="write every run as JSON")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.config]
    if any(len(pair) != 2 or pair[0] not in TASKS for pair in pairs):
        parser.error(f"--config must be TASK=YAML with TASK one of {list(TASKS)}, got {args.config}")
    args.configs = dict(pairs)
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    started = time.time()
    runs = [run for name in args.tasks for run in sweep(name, args)]
    minutes = (time.time() - started) / 60
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(run) for run in runs], indent=1))
    if args.plot:
        plot(runs, args, args.plot)
    command = " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    section = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU; torch {torch.__version__}; "
            f"{minutes:.0f} min in all. Metric on the demo val split (`limit_val_batches={args.val_batches}`); "
            f"{args.coarse_samples} coarse / {args.fine_samples} fine calibration samples; mean ± standard deviation "
            f"over seeds {args.seeds} (calibration subset and zeroth-order directions); magnitude uses no data.",
            "",
            table(runs, args),
        ]
    )
    print(section)
    if args.write:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
