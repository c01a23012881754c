"""How well ECoFLaP's zeroth-order block scores rank Gemma-3-270M's blocks, by probes and calibration samples.

The model, text and calibration batches are those of ``gemma_lm.py`` (its ``Bench``: Gemma-3-270M from the registry
wheels, KJV Old Testament chapters of 128 tokens in batches of 4, the task's LM loss). On one seed's calibration
batches this script measures, in one process:

- the exact reference ``Σ_batches Σ_tensors ‖∇_W L_b‖₂`` per decoder block, by autograd (``_reference.py``), which
  the per-tensor zeroth-order probe estimates up to the constant ``sqrt(2/π)``;
- first order on every sample count, with ``gemma_lm.py``'s score (``grad_mag_abs``, Σ|g·w|) and with the
  zeroth-order estimator's (``grad_only``, Σ|g|): wall time and Spearman ρ against the reference;
- the zeroth-order coarse step for the cells given by ``--measure`` (granularity, probes per batch, samples): wall
  time and the ρ of the scores it really produced;
- the ρ expected for every granularity x probes x samples cell from the exact per-tensor, per-batch norms alone
  (``simulated_spearman``: ``zᵀg ~ N(0, ‖g‖²)`` for Gaussian directions), with its cost in first-order coarse steps.

Each measurement is appended to ``--cache`` (``benchmarks/zo_quality.jsonl``) as it finishes, so an interrupted
run resumes where it stopped and the section can be rendered again without the model.

Usage::

    pip install -e ".[bench]"
    python benchmarks/zo_quality.py --threads 1 --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from _reference import block_reference, exact_gradient_norms, group_spearman, simulated_spearman
from _results import publish_section
from gemma_lm import FIRST, ZEROTH, Bench
from gemma_lm import parse_args as gemma_args

from ecoflap_pl.pruning import PruningConfig, score_groups

logger = logging.getLogger("zo_quality")
SECTION = "## Gemma-3-270M: zeroth-order probes against exact gradient norms"
GRANULARITIES = ("per_block", "per_tensor")
FIRST_SCORES = ("grad_mag_abs", "grad_only")


def _cell(text: str) -> tuple[str, int, int]:
    granularity, probes, samples = text.split(":")
    if granularity not in GRANULARITIES:
        raise argparse.ArgumentTypeError(f"granularity {granularity!r}: one of {GRANULARITIES}")
    return granularity, int(probes), int(samples)


class Study:
    """The Gemma bench and its calibration batches, plus a JSON-lines cache of finished measurements, keyed by name."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache: dict[str, dict[str, Any]] = {}
        if args.cache.exists():
            for line in args.cache.read_text().splitlines():
                record = json.loads(line)
                self.cache[record["name"]] = record

    @cached_property
    def bench(self) -> Bench:
        """Built on the first measurement that is not cached (rendering from the cache needs no model)."""
        return Bench(gemma_args(["--workdir", str(self.args.workdir), "--batch-size", str(self.args.batch_size)]))

    @cached_property
    def batches(self) -> list[dict[str, Any]]:
        return self.bench.calibration(self.args.seed, max(self.args.samples))

    def measure(self, name: str, work: Any) -> dict[str, Any]:
        if name in self.cache:
            logger.info("Reusing %s from %s", name, self.args.cache)
            return self.cache[name]
        logger.info("Measuring %s", name)
        record = {"name": name, **work()}
        record["load"] = os.getloadavg()[0]
        self.args.cache.parent.mkdir(parents=True, exist_ok=True)
        with self.args.cache.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.cache[name] = record
        logger.info("%s: %.1f s", name, record["seconds"])
        return record

    def scores(self, samples: int, settings: dict[str, Any]) -> dict[str, Any]:
        config = PruningConfig(sparsity=0.5, coarse_samples=samples, seed=self.args.seed, **settings)
        result = score_groups(self.bench.task.model, self.batches, self.bench.loss, config)
        groups = {group: list(names) for group, names in result.groups.items()}
        return {"scores": result.scores, "seconds": result.stats.seconds, "groups": groups}

    def reference(self) -> dict[str, Any]:
        fewest = min(self.args.samples)
        groups = self.measure(f"first_order:grad_mag_abs:{fewest}", partial(self.scores, fewest, FIRST))["groups"]

        def work() -> dict[str, Any]:
            started = time.perf_counter()
            names = [name for names in groups.values() for name in names]
            norms = exact_gradient_norms(self.bench.task.model, self.batches, self.bench.loss, names)
            return {"norms": norms, "groups": groups, "seconds": time.perf_counter() - started}

        return self.measure("reference", work)


def render(args: argparse.Namespace, argv: list[str], study: Study, reference: dict[str, Any]) -> str:
    norms, groups = reference["norms"], reference["groups"]
    batch = args.batch_size

    def exact(samples: int) -> dict[str, float]:
        return block_reference(norms[: -(-samples // batch)], groups)

    first = {s: study.cache[f"first_order:grad_mag_abs:{s}"] for s in args.samples}
    first_rows = []
    for samples in args.samples:
        cells = []
        for score in FIRST_SCORES:
            record = study.cache[f"first_order:{score}:{samples}"]
            rho = group_spearman(record["scores"], exact(samples), sorted(groups))
            cells.append(f"{record['seconds']:.1f} | {rho:.3f}")
        first_rows.append(f"| {samples} | " + " | ".join(cells) + " |")
    unit = {}  # measured zeroth-order seconds per probe per sample, by granularity
    measured_rows = []
    for granularity, probes, samples in args.measure:
        record = study.cache[f"zeroth_order:{granularity}:{probes}:{samples}"]
        unit.setdefault(granularity, record["seconds"] / (probes * samples))
        value = group_spearman(record["scores"], exact(samples), sorted(groups))
        base = first[samples]["seconds"] if samples in first else float("nan")
        measured_rows.append(
            f"| {granularity} | {probes} | {samples} | {record['seconds']:.1f} | {record['seconds'] / base:.1f}x | "
            f"{value:.3f} | {record['load']:.1f} |"
        )
    tensors = sum(len(names) for names in groups.values())
    scaled = ""
    if "per_tensor" not in unit and "per_block" in unit:
        # Every probe runs the same forward, from the probed block on; per tensor there are tensors/blocks as many.
        unit["per_tensor"] = unit["per_block"] * tensors / len(groups)
        scaled = (
            f" Per-tensor costs are the measured per-block cost times {tensors / len(groups):.0f} (the tensors per "
            "block): each probe runs the forward from its block on, whichever of the block's tensors it perturbs."
        )
    first_per_sample = {s: first[s]["seconds"] / s for s in args.samples}
    tables = []
    for granularity in GRANULARITIES:
        lines = [
            "| samples | " + " | ".join(f"{p} probe(s)" for p in args.probes) + " |",
            "|---|" + "---|" * len(args.probes),
        ]
        for samples in args.samples:
            cells = []
            for probes in args.probes:
                mean, low = simulated_spearman(
                    norms, groups, probes, -(-samples // batch), per_block=granularity == "per_block"
                )
                cost = unit[granularity] * probes * samples
                cells.append(f"{mean:.3f} ({low:.2f}; {cost / 60:.0f} min, {cost / first[samples]['seconds']:.0f}x)")
            lines.append(f"| {samples} | " + " | ".join(cells) + " |")
        tables += [f"`probe_granularity: {granularity}`:", "\n".join(lines)]
    values = [n for batch_norms in norms for n in batch_norms.values()]
    loads = sorted(record["load"] for record in study.cache.values())
    paragraphs = [
        SECTION,
        f"Command: `{' '.join(['python', 'benchmarks/zo_quality.py', *argv])}`",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}) shared with other jobs (1-minute load average "
        f"{loads[0]:.1f} to {loads[-1]:.1f} at the end of the measurements), no GPU; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), fp32. Measurements run one at a time, each kept in "
        f"`{args.cache}` with the 1-minute load average when it ended (rows measured by different processes met "
        f"different loads; compare wall times of rows with similar load). All are on seed {args.seed}'s "
        f"calibration batches (`gemma_lm.py`'s: KJV Old Testament chapters of 128 tokens in batches of {batch}); "
        f"{len(groups)} decoder blocks of {tensors} weight tensors in all. Exact reference: "
        f"Σ_batches Σ_tensors ‖∇_W L_b‖₂ per block by autograd ({reference['seconds']:.1f} s for "
        f"{len(norms)} batches); the per-tensor, per-batch norms range from {min(values):.1e} to {max(values):.1e}.",
        "First order (aggregate sum), wall seconds of the coarse step and Spearman ρ against the exact reference "
        "on the same samples, with `gemma_lm.py`'s score grad_mag_abs (Σ|g·w|, what `ecoflap_fo_*` rank by) "
        "and with grad_only (Σ|g|, the zeroth-order estimator's score):",
        "\n".join(
            [
                "| samples | grad_mag_abs wall s | grad_mag_abs ρ | grad_only wall s | grad_only ρ |",
                "|---|---|---|---|---|",
                *first_rows,
            ]
        ),
        "Zeroth order (score grad_only, aggregate sum, ε = 1e-3, prefix reuse and up to 8 probes per forward), "
        "measured: wall seconds, that over first order's on the same samples, and the ρ of the scores it produced:",
        "\n".join(
            [
                "| granularity | probes per batch | samples | wall s | over first order | Spearman ρ | load |",
                "|---|---|---|---|---|---|---|",
                *measured_rows,
            ]
        ),
        "Zeroth order, Spearman ρ expected from the exact per-tensor, per-batch norms (mean over 200 draws of the "
        "directions; in brackets the 10th percentile, which 9 draws in 10 reach, then the coarse step's wall "
        "time scaled from the measured zeroth-order runs by probes x samples, and that time over first order's "
        f"measured on the same samples: {', '.join(f'{first_per_sample[s]:.1f}' for s in args.samples)} s per "
        f"sample).{scaled}",
        *tables,
    ]
    return "\n\n".join(paragraphs) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="calibration subset (and zeroth-order directions)")
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16], help="coarse calibration samples")
    parser.add_argument(
        "--probes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64], help="probes per batch (expected ρ)"
    )
    parser.add_argument(
        "--measure",
        type=_cell,
        nargs="+",
        default=[_cell("per_block:1:4"), _cell("per_block:4:4")],
        help="zeroth-order runs, as granularity:probes:samples",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--workdir", type=Path, default=Path("runs/gemma_lm"))
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/zo_quality.jsonl"))
    parser.add_argument("--write", default=None, help="markdown file whose section is (re)written")
    args = parser.parse_args(argv)
    missing = [s for _, _, s in args.measure if s not in args.samples]
    if missing:
        parser.error(f"--measure uses samples {missing} not in --samples {args.samples}. HINT: add them to --samples.")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    study = Study(args)
    reference = study.reference()
    for samples in args.samples:
        for score in FIRST_SCORES:
            settings = {**FIRST, "score": score}
            study.measure(f"first_order:{score}:{samples}", partial(study.scores, samples, settings))
    for granularity, probes, samples in args.measure:
        settings = {**ZEROTH, "probe_granularity": granularity, "probes": probes}
        study.measure(f"zeroth_order:{granularity}:{probes}:{samples}", partial(study.scores, samples, settings))
    publish_section(render(args, argv, study, reference), SECTION, args.write)


if __name__ == "__main__":
    main()
