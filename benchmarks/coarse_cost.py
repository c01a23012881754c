"""What ECoFLaP's coarse step costs, and how well it ranks groups, on a BLIP-2-shaped model.

A ``Blip2ForConditionalGeneration`` (EVA-style ViT, one-layer Q-Former, OPT decoder) is built at random from a
scaled-down config (tens of millions of parameters) and scored with the model's own prefix-LM captioning loss by:

- ``zeroth_order`` with one probe per weight tensor (``per_tensor``, the paper's estimator), three ways: the plain
  loop (one full forward per probe, ``activation_storage="recompute"``), with prefix reuse only
  (``max_probe_replicas=1``), and with prefix reuse and 8 probes per forward (the default),
- ``zeroth_order`` with one probe per block (``per_block``),
- ``first_order`` (streamed back-propagation),
- ``gradient_norm`` (the per-tensor zeroth-order estimate's expectation by the same streamed back-propagation, so its
  ranking must equal the reference's),

all with ``score="grad_only"``, ``aggregate="sum"``. For each: full forward passes, backward passes, wall time, peak
resident memory, and the Spearman rank correlation of its block scores with an exact reference computed by autograd:
``Σ_batches Σ_tensors ‖∇_W L_b‖₂`` per block, the quantity the per-tensor zeroth-order estimate approximates (up to
the constant ``sqrt(2/π)``). It also times the fine step (Wanda) against one dense forward pass over the same
calibration data, with one calibration batch per block replay and with the batches stacked. Every measurement runs
in its own fresh process, so peak memory is not inherited from another.

A last part measures how the per-tensor estimate's Spearman ρ grows with the probes per batch and the calibration
samples: independent one-probe runs (seeds 0, 1, ...) on each batch, combined as ``probes`` x ``samples``.

Usage::

    python benchmarks/coarse_cost.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Any

import torch
from _reference import exact_gradient_norms, group_spearman, simulated_spearman
from _results import publish_section
from transformers import Blip2ForConditionalGeneration

from ecoflap_pl import PruningConfig, prune, score_groups
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import IMAGE_ID
from ecoflap_pl.pruning.fast_zeroth_order import fast_zeroth_order_sums
from ecoflap_pl.pruning.monitor import StageMonitor, resident_bytes

logger = logging.getLogger("coarse_cost")
METHODS = {
    "zeroth_order/per_tensor, plain loop": {
        "importance": "zeroth_order",
        "probe_granularity": "per_tensor",
        "activation_storage": "recompute",
    },
    "zeroth_order/per_tensor, prefix reuse": {
        "importance": "zeroth_order",
        "probe_granularity": "per_tensor",
        "max_probe_replicas": 1,
    },
    "zeroth_order/per_tensor, prefix reuse + 8 probes per forward": {
        "importance": "zeroth_order",
        "probe_granularity": "per_tensor",
        "max_probe_replicas": 8,
    },
    "zeroth_order/per_block": {"importance": "zeroth_order", "probe_granularity": "per_block"},
    "first_order": {"importance": "first_order"},
    "gradient_norm": {"importance": "gradient_norm", "probe_granularity": "per_tensor"},
}
PLAIN, FAST = "zeroth_order/per_tensor, plain loop", "zeroth_order/per_tensor, prefix reuse + 8 probes per forward"
WORKERS = (*METHODS, "reference", "fine", "grid")
SECTION = "## Coarse step cost"
VOCAB = 512
FIRST_WORD_ID = 8


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The seeded BLIP-2-shaped model and its calibration batches (identical in every worker)."""
    config = tiny_config(
        "blip2_opt",
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        layers=args.layers,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_query_tokens=args.query_tokens,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, args.samples, args.batch_size):
        size = min(args.batch_size, args.samples - start)
        input_ids = torch.randint(
            FIRST_WORD_ID, VOCAB, (size, args.query_tokens + args.text_tokens), generator=generator
        )
        input_ids[:, : args.query_tokens] = IMAGE_ID  # transformers 5 scatters the Q-Former outputs into these
        pixel_values = torch.randn(size, 3, args.image_size, args.image_size, generator=generator)
        labels = input_ids.masked_fill(input_ids == IMAGE_ID, -100)
        batches.append({"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels})
    return model, batches


def captioning_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _scores(model: torch.nn.Module, batches: list[Any], args: argparse.Namespace, **settings: Any) -> Any:
    config = PruningConfig(sparsity=0.5, coarse_samples=args.samples, seed=0, **settings)
    return score_groups(model, batches, captioning_loss, config)


def one_probe_estimates(
    model: torch.nn.Module, batches: list[Any], groups: dict[str, tuple[str, ...]], seeds: int
) -> list[list[dict[str, float]]]:
    """``estimates[seed][batch][group]``: Σ over the group's tensors of one probe's |ĝ| on one batch (fast path)."""
    parameters = dict(model.named_parameters())
    units = {name: [parameters[name]] for names in groups.values() for name in names}
    estimates = []
    for seed in range(seeds):
        per_batch = []
        for batch_id, batch in enumerate(batches):
            with StageMonitor(torch.device("cpu")) as monitor:
                sums = fast_zeroth_order_sums(
                    model,
                    units,
                    [(batch_id, batch)],
                    captioning_loss,
                    eps=1e-3,
                    probes=1,
                    seed=seed,
                    monitor=monitor,
                    max_replicas=8,
                )
            per_batch.append({group: sum(sums[n] for n in names) for group, names in groups.items()})
        estimates.append(per_batch)
    return estimates


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    most = max(args.samples, args.fine_samples, *args.grid_samples, *args.study_samples)
    model, batches = build(argparse.Namespace(**{**vars(args), "samples": most}))
    if args.worker == "fine":
        batches = batches[: -(-args.fine_samples // args.batch_size)]
    elif args.worker not in ("reference", "grid"):
        batches = batches[: -(-args.samples // args.batch_size)]
    rss_before = resident_bytes()
    if args.worker in METHODS:
        scores = _scores(model, batches, args, **METHODS[args.worker])
        return {"scores": scores.scores, "stats": scores.stats.to_dict(), "rss_before": rss_before}
    if args.worker == "reference":
        groups = _scores(model, batches, args, importance="first_order").groups
        started = time.perf_counter()
        norms = exact_gradient_norms(model, batches, captioning_loss, [n for names in groups.values() for n in names])
        per_batch = [{group: sum(batch[name] for name in names) for group, names in groups.items()} for batch in norms]
        used = per_batch[: -(-args.samples // args.batch_size)]
        scores = {group: sum(totals[group] for totals in used) for group in groups}
        return {
            "scores": scores,
            "per_batch": per_batch,
            "norms": norms,
            "groups": {group: list(names) for group, names in groups.items()},
            "tensor_norms": {name: min(batch[name] for batch in norms) for name in norms[0]},
            "seconds": time.perf_counter() - started,
        }
    if args.worker == "grid":
        groups = _scores(model, batches, args, importance="first_order").groups
        return {"estimates": one_probe_estimates(model, batches, groups, max(args.grid_probes))}
    dense = []
    with torch.no_grad():
        for _ in range(3):
            started = time.perf_counter()
            losses = [float(captioning_loss(model, batch)) for batch in batches]
            dense.append(time.perf_counter() - started)
    fine = {}
    for most in (1, PruningConfig().fine_replay_batches):
        config = PruningConfig(
            sparsity=0.5, importance="uniform", fine_samples=args.fine_samples, fine_replay_batches=most
        )
        result = prune(copy.deepcopy(model), batches, captioning_loss, config)
        fine[most] = result.stages["fine"].to_dict()
    return {
        "dense_seconds": sorted(dense)[1],
        "losses": losses,
        "fine": fine,
        "parameters": sum(p.numel() for p in model.parameters()),
        "candidates": sum(result.sizes.values()),
        "tensors": len(result.sizes),
        "groups": len(result.groups),
        "towers": {tower: list(groups) for tower, groups in result.towers.items()},
    }


def _spawn(worker: str, argv: list[str], cache: str | None) -> dict[str, Any]:
    kept = None if cache is None else pathlib.Path(cache) / (re.sub(r"\W+", "_", worker) + ".json")
    if kept is not None and kept.exists():
        logger.info("Reusing %s from %s", worker, kept)
        return json.loads(kept.read_text())
    logger.info("Running %s in a fresh process", worker)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", worker], check=True, capture_output=True, text=True
    )
    logger.info("%s done in %.1f s", worker, time.perf_counter() - started)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(result))
    return result


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "n/a"


def render(args: argparse.Namespace, argv: list[str], results: dict[str, Any], load: tuple[str, str]) -> str:
    fine, reference = results["fine"], results["reference"]["scores"]
    mib = 1024 * 1024
    blocks_per_forward = sum(len(groups) for groups in fine["towers"].values())

    def rho(scores: dict[str, float], groups: list[str]) -> str:
        return f"{group_spearman(scores, reference, groups):.3f}"

    plain_seconds = results[PLAIN]["stats"]["seconds"]
    rows = []
    for method in METHODS:
        data = results[method]
        stats = data["stats"]
        per_tower = " | ".join(rho(data["scores"], groups) for groups in fine["towers"].values())
        zeros = sum(score == 0.0 for score in data["scores"].values())
        block_runs = stats["block_forwards"] or stats["full_forwards"] * blocks_per_forward
        rows.append(
            f"| {method} | {stats['full_forwards']} | {block_runs} | {stats['backward_passes']} | "
            f"{stats['seconds']:.1f} | {plain_seconds / stats['seconds']:.2f}x | "
            f"{stats['peak_memory_bytes'] / mib:.0f} | {(stats['peak_memory_bytes'] - data['rss_before']) / mib:.0f} | "
            f"{rho(data['scores'], sorted(reference))} | {per_tower} | {zeros} |"
        )
    grid = results["grid"]["estimates"]
    per_batch = results["reference"]["per_batch"]
    grid_rows = []
    fast_seconds = results[FAST]["stats"]["seconds"]
    first_order_seconds = results["first_order"]["stats"]["seconds"]
    for samples in args.grid_samples:
        used = -(-samples // args.batch_size)
        exact = {g: sum(totals[g] for totals in per_batch[:used]) for g in per_batch[0]}
        cells = []
        for probes in args.grid_probes:
            estimate = {
                g: sum(sum(grid[seed][b][g] for seed in range(probes)) / probes for b in range(used)) for g in exact
            }
            value = group_spearman(estimate, exact, sorted(exact))
            cost = fast_seconds * probes * samples / args.samples
            cells.append(f"{value:.3f} ({cost:.0f} s, {cost / first_order_seconds:.0f}x)")
        grid_rows.append(f"| {samples} | " + " | ".join(cells) + " |")
    study_groups = results["reference"]["groups"]
    study_norms = results["reference"]["norms"]
    per_block_seconds = results["zeroth_order/per_block"]["stats"]["seconds"]
    study = {}
    for per_block, seconds in ((False, fast_seconds), (True, per_block_seconds)):
        header = " | ".join(f"{p} ({p * seconds / first_order_seconds:.0f}x)" for p in args.study_probes)
        lines = [f"| samples | {header} |", "|---|" + "---|" * len(args.study_probes)]
        for samples in args.study_samples:
            cells = []
            for probes in args.study_probes:
                mean, low = simulated_spearman(
                    study_norms, study_groups, probes, -(-samples // args.batch_size), per_block=per_block
                )
                cells.append(f"{mean:.3f} ({low:.2f})")
            lines.append(f"| {samples} | " + " | ".join(cells) + " |")
        study[per_block] = lines
    eps = PruningConfig().eps
    floor = max(float(torch.finfo(torch.float32).eps) * 2 ** math.floor(math.log2(loss)) for loss in fine["losses"])
    floor /= 2 * eps
    norms = results["reference"]["tensor_norms"]
    tower_norms = {
        tower.split(".")[0]: [norms[name] for name in norms if name.startswith(tower + ".")] for tower in fine["towers"]
    }
    norm_ranges = "; ".join(f"{tower} {min(v):.1e} to {max(v):.1e}" for tower, v in tower_norms.items())
    towers = ", ".join(f"{tower} ({len(groups)} blocks)" for tower, groups in fine["towers"].items())
    tower_columns = "".join(f" ρ {tower.split('.')[0]} |" for tower in fine["towers"])
    batches = -(-args.samples // args.batch_size)
    most = PruningConfig().fine_replay_batches
    alone, stacked = fine["fine"]["1"], fine["fine"][str(most)]
    ratio, ratio_alone = stacked["seconds"] / fine["dense_seconds"], alone["seconds"] / fine["dense_seconds"]
    command = " ".join(["python", "benchmarks/coarse_cost.py", *argv])
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, shared with "
            f"other jobs (load average {load[0]} before, {load[1]} after); torch {torch.__version__}, "
            f"{args.threads} intra-op thread(s), fp32. Wall times on this shared machine are noisy; the counts are "
            "exact.",
            "",
            f"Model: random-init `Blip2ForConditionalGeneration` (ViT + 1-layer Q-Former + OPT), hidden "
            f"{args.hidden}, {args.layers} blocks per tower, {args.image_size}x{args.image_size} images in "
            f"{args.patch_size}x{args.patch_size} patches, {args.query_tokens} query tokens, {args.text_tokens} text "
            f"tokens: {fine['parameters'] / 1e6:.1f} M parameters, {fine['candidates'] / 1e6:.1f} M of them in "
            f"{fine['tensors']} candidate tensors, {fine['groups']} groups ({towers}). Calibration: {args.samples} "
            f"samples in {batches} batches of {args.batch_size}; loss = prefix-LM captioning loss.",
            "",
            "| coarse step | loss_fn calls | block runs | backward passes | wall s | speed-up vs plain loop "
            "| peak RSS MiB | RSS growth MiB | Spearman ρ |" + tower_columns + " groups scored 0 |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(fine["towers"]) + 1),
            *rows,
            "",
            "loss_fn calls counts every call of the calibration loss; with prefix reuse most of them run only part of "
            "the model (the record of each batch, a replay check on the first batch, then per probe forward the "
            "blocks from the probed one on; with 8 probes per forward, one forward of the blocks on 8 copies of the "
            "batch plus 8 calls that run only the glue between blocks, to read each copy's loss). Block runs counts "
            f"the transformer blocks that really ran, one per sample copy ({blocks_per_forward} per full forward "
            "without reuse); it is the work the wall time follows.",
            "",
            "Spearman ρ: rank correlation over all groups (blocks), then within each tower, with the exact reference "
            "Σ_batches Σ_tensors ‖∇_W L‖₂ from autograd (what the per-tensor zeroth-order probe estimates, times "
            "sqrt(2/π)); all use `score=grad_only`, `aggregate=sum`, one probe per batch, ε = 1e-3. First order "
            "sums |g| elementwise (an L1 norm), per-block probes measure the norm of the whole block's gradient; "
            "`gradient_norm` is the engine's own computation of the reference (streamed back-propagation), so its ρ "
            "must be 1. "
            "Peak RSS is the resident set of the whole process (Python, torch, model, data); RSS growth is the peak "
            "minus the resident set once the model and data were loaded.",
            "",
            f"Precision floor: the fp32 loss (≈ {sum(fine['losses']) / len(fine['losses']):.2f}) changes in steps "
            f"of one ulp, so a two-point probe resolves |ĝ| only down to ulp(L)/(2ε) ≈ {floor:.1e}; smaller "
            "estimates come out as 0 or as a multiple of that step. The exact per-tensor, per-batch gradient norms "
            f"‖∇_W L_b‖₂ (the scale of |ĝ|) range over: {norm_ranges}.",
            "",
            f"Fine step (Wanda, uniform 50%, {args.fine_samples} samples in batches of {args.batch_size}, one dense "
            f"forward pass over them: {fine['dense_seconds']:.2f} s): one batch per block replay "
            f"{alone['seconds']:.1f} s = {ratio_alone:.1f}x; up to {most} batches stacked per replay "
            f"{stacked['seconds']:.1f} s = {ratio:.1f}x; {stacked['full_forwards']} loss_fn calls (capture forwards, "
            "stopped at each tower's last block; after each tower's first batch they run only the tower's first block) "
            f"and {stacked['block_forwards']} block forwards (counted per batch) each.",
            "",
            f"Spearman ρ of the per-tensor zeroth-order block scores against the exact reference on the same samples, "
            f"by probes per batch (columns: {', '.join(map(str, args.grid_probes))}) and calibration samples (rows); "
            "independent one-probe runs combined; in brackets the wall time the fast path would take for them, scaled "
            f"from its measured {fast_seconds:.1f} s for 1 probe x {args.samples} samples, and that time over the "
            f"first-order coarse step's {first_order_seconds:.1f} s on {args.samples} samples:",
            "",
            "| samples | " + " | ".join(f"{p} probe(s)" for p in args.grid_probes) + " |",
            "|---|" + "---|" * len(args.grid_probes),
            *grid_rows,
            "",
            "Spearman ρ expected from the exact per-tensor, per-batch gradient norms (mean over 200 draws of the "
            "directions, in brackets the 10th percentile: 9 runs in 10 reach it), by probes per batch (columns; in "
            "brackets the zeroth-order wall time over the first-order one, both scaling with the samples, from the "
            "measured rows above) and calibration samples (rows). For Gaussian directions zᵀg ~ N(0, ‖g‖²) exactly, "
            "so |ĝ| = ‖g‖·|N(0, 1)| up to the O(ε²) finite difference and the loss's rounding; the measured ρ grid "
            "above is one draw of the same distribution. Per-tensor probes (`probe_granularity: per_tensor`):",
            "",
            *study[False],
            "",
            "One direction per block (`probe_granularity: per_block`; |ĝ| = ‖∇_block L‖·|N(0, 1)|), against the same "
            "reference:",
            "",
            *study[True],
            "",
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=384, help="width of every tower")
    parser.add_argument("--layers", type=int, default=12, help="blocks in the ViT and in the OPT decoder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--query-tokens", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples of the coarse step")
    parser.add_argument("--fine-samples", type=int, default=32, help="calibration samples of the fine step")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--grid-probes", type=int, nargs="+", default=[1, 2, 4], help="probes per batch (ρ grid)")
    parser.add_argument("--grid-samples", type=int, nargs="+", default=[8, 16], help="calibration samples (ρ grid)")
    parser.add_argument(
        "--study-probes", type=int, nargs="+", default=[1, 4, 16, 32, 64], help="probes per batch (simulated ρ)"
    )
    parser.add_argument(
        "--study-samples", type=int, nargs="+", default=[8, 16, 32, 64], help="calibration samples (simulated ρ)"
    )
    parser.add_argument("--cache", default=None, help="folder keeping each worker's result; kept ones are reused")
    parser.add_argument("--write", default=None, help="markdown file whose coarse-cost section is (re)written")
    parser.add_argument("--worker", choices=WORKERS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load_before = _load_average()
    results = {worker: _spawn(worker, argv, args.cache) for worker in ("fine", "reference", *METHODS, "grid")}
    section = render(args, argv, results, (load_before, _load_average()))
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
