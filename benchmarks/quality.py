"""Quality of ECoFLaP against the baselines on the demo tasks: metric, pruning time and peak memory per method.

For each demo config (BLIP-2 VQA accuracy, BLIP-2 captioning CIDEr, ViT ImageNet-layout top-1) the task, the
DataModule and its trained demo model are built once through the ``ecoflap`` parser; then, for every method, target
sparsity and seed, the dense weights are restored, the ``ECoFLaPPruning`` callback prunes through
``Trainer.validate`` (the path users run) and the validation metric is recorded. Seeds vary the calibration subset
(``calibration_seed``) and the zeroth-order directions (``seed``); magnitude pruning uses no data and runs once.

With ``--json`` every run is saved as it finishes, and a rerun with the same file skips the runs already in it, so a
sweep can be interrupted, or extended by a method, without redoing the rest; the table and plot cover every run in the
file.

Usage::

    python benchmarks/quality.py --json benchmarks/quality.json --write benchmarks/RESULTS.md --plot quality.png
    python benchmarks/quality.py --json benchmarks/quality.json --methods ecoflap_fo_sparsegpt --write ...
    python benchmarks/quality.py --json benchmarks/quality.json --report-only --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _results import dump_json, publish_section, validate_on_cpu

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
    "ecoflap_fo_sparsegpt": {"importance": "first_order", "score": "grad_mag_abs", "method": "sparsegpt"},
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
    callbacks = [pruning] if pruning is not None else []
    return validate_on_cpu(task, data, metric, args.workdir, limit_val_batches=args.val_batches, callbacks=callbacks)


def _key(run: Run) -> tuple[str, str, float, int]:
    return run.task, run.method, run.sparsity, run.seed


def planned(name: str, args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """The (method, sparsity, seed) runs of task ``name`` that ``args`` asks for."""
    return [
        (method, sparsity, seed)
        for method in args.methods
        for sparsity in args.sparsities
        for seed in (args.seeds[:1] if method in DETERMINISTIC else args.seeds)
    ]


def sweep(name: str, args: argparse.Namespace, runs: list[Run]) -> None:
    """Append to ``runs`` (saving them to ``--json`` as they finish) the runs of task ``name`` not already there."""
    done = {_key(run) for run in runs}
    todo = [(m, s, seed) for m, s, seed in planned(name, args) if (name, m, s, seed) not in done]
    has_dense = (name, "dense", 0.0, 0) in done
    if not todo and has_dense:
        logger.info("%s: every run is already in %s", name, args.json)
        return
    config, metric = args.configs.get(name, TASKS[name][0]), TASKS[name][1]
    task, data = build(config)
    dense_state = {key: value.detach().clone() for key, value in task.state_dict().items()}
    if not has_dense:
        runs.append(Run(name, "dense", 0.0, 0, evaluate(task, data, metric, args, None), 0.0, 0.0, 0.0))
        logger.info("%s dense: %s = %.4f", name, metric, runs[-1].metric)
        save(runs, args)
    for method, sparsity, seed in todo:
        settings = METHODS[method]
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
        save(runs, args)
    task.load_state_dict(dense_state)


def load(path: str | None) -> tuple[list[dict[str, Any]], list[Run]]:
    """The invocations and runs saved in ``path`` (none if it does not exist)."""
    if not path or not Path(path).is_file():
        return [], []
    saved = json.loads(Path(path).read_text())
    return saved["invocations"], [Run(**run) for run in saved["runs"]]


def save(runs: list[Run], args: argparse.Namespace) -> None:
    if args.json:
        dump_json(args.json, {"invocations": args.invocations, "runs": [asdict(run) for run in runs]})


def reported(runs: list[Run]) -> tuple[list[str], list[float], list[int]]:
    """The methods (in ``METHODS`` order), sparsities and seeds that ``runs`` cover."""
    methods = [method for method in METHODS if any(run.method == method for run in runs)]
    sparsities = sorted({run.sparsity for run in runs if run.method != "dense"})
    return methods, sparsities, sorted({run.seed for run in runs if run.method != "dense"})


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[Run], args: argparse.Namespace) -> str:
    methods, sparsities, _ = reported(runs)
    lines = []
    for name, (default_config, metric) in TASKS.items():
        config = args.configs.get(name, default_config)
        task_runs = [run for run in runs if run.task == name]
        if not task_runs:
            continue
        dense = next(run.metric for run in task_runs if run.method == "dense")
        header = " | ".join(f"{100 * s:.0f}%" for s in sparsities)
        lines += [
            f"**{name}** (`{config}`, `{metric}`; dense {dense:.3f})",
            "",
            f"| method | {header} | prune s | peak MiB |",
            "|---|" + "---|" * len(sparsities) + "---|---|",
        ]
        for method in methods:
            chosen = [r for r in task_runs if r.method == method]
            if not chosen:
                continue
            cells = []
            for sparsity in sparsities:
                values = [r.metric for r in task_runs if r.method == method and r.sparsity == sparsity]
                cells.append(_mean_spread(values) if values else "")
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

    methods, sparsities, _ = reported(runs)
    names = [name for name in TASKS if any(run.task == name for run in runs)]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        task_runs = [run for run in runs if run.task == name]
        dense = next(run.metric for run in task_runs if run.method == "dense")
        axis.axhline(dense, color="black", linestyle=":", label="dense")
        for method in methods:
            xs, means, spreads = [], [], []
            for sparsity in sparsities:
                values = [r.metric for r in task_runs if r.method == method and r.sparsity == sparsity]
                if values:
                    xs.append(100 * sparsity)
                    means.append(statistics.mean(values))
                    spreads.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            if not xs:
                continue
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
    parser.add_argument(
        "--json", default=None, help="JSON file of every run, saved as each finishes; runs already in it are skipped"
    )
    parser.add_argument("--report-only", action="store_true", help="only write the table (and plot) of --json")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.config]
    if any(len(pair) != 2 or pair[0] not in TASKS for pair in pairs):
        parser.error(f"--config must be TASK=YAML with TASK one of {list(TASKS)}, got {args.config}")
    args.configs = dict(pairs)
    if args.report_only and not (args.json and Path(args.json).is_file()):
        parser.error(f"--report-only reports the runs of --json, but {args.json!r} is no file")
    return args


def _commit() -> str:
    completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return completed.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    args.invocations, runs = load(args.json)
    if not args.report_only:
        started = time.time()
        args.invocations.append(
            {
                "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
                "commit": _commit(),
                "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
                "calibration": f"{args.coarse_samples} coarse / {args.fine_samples} fine samples",
                "limit_val_batches": args.val_batches,
            }
        )
        for name in args.tasks:
            sweep(name, args, runs)
        args.invocations[-1]["minutes"] = round((time.time() - started) / 60, 1)
        save(runs, args)
    if args.plot:
        plot(runs, args, args.plot)
    _, _, seeds = reported(runs)
    invocations = [
        f"- `{i['command']}` at commit `{i['commit']}`: {i['machine']}; {i['calibration']}; "
        f"`limit_val_batches={i['limit_val_batches']}`; {i.get('minutes', '?')} min."
        + (f" {i['note']}" if i.get("note") else "")
        for i in args.invocations
    ]
    section = "\n".join(
        [
            SECTION,
            "",
            f"Runs: `{args.json}` ({len(runs)} runs), made by" if args.json else "Made by",
            "",
            *invocations,
            "",
            f"Metric on the demo val split; mean ± standard deviation over seeds {seeds} (calibration subset and "
            "zeroth-order directions); magnitude uses no data.",
            "",
            table(runs, args),
        ]
    )
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
