"""What ECoFLaP's coarse step costs, and how well it ranks groups, on a BLIP-2-shaped model.

A ``Blip2ForConditionalGeneration`` (EVA-style ViT, one-layer Q-Former, OPT decoder) is built at random from a
scaled-down config (tens of millions of parameters) and scored with the model's own prefix-LM captioning loss by:

- ``zeroth_order`` with one probe per weight tensor (``per_tensor``, the paper's estimator),
- ``zeroth_order`` with one probe per block (``per_block``),
- ``first_order`` (streamed back-propagation),

all with ``score="grad_only"``, ``aggregate="sum"``. For each: full forward passes, backward passes, wall time, peak
resident memory, and the Spearman rank correlation of its block scores with an exact reference computed by autograd:
``Σ_batches Σ_tensors ‖∇_W L_b‖₂`` per block, the quantity the per-tensor zeroth-order estimate approximates (up to
the constant ``sqrt(2/π)``). It also times the fine step (Wanda) against one dense forward pass over the same
calibration data. Every measurement runs in its own fresh process, so peak memory is not inherited from another.

Usage::

    python benchmarks/coarse_cost.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch
from _results import write_section
from scipy.stats import spearmanr
from transformers import Blip2ForConditionalGeneration

from ecoflap_pl import PruningConfig, prune, score_groups
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import IMAGE_ID

logger = logging.getLogger("coarse_cost")
METHODS = {
    "zeroth_order/per_tensor": {"importance": "zeroth_order", "probe_granularity": "per_tensor"},
    "zeroth_order/per_block": {"importance": "zeroth_order", "probe_granularity": "per_block"},
    "first_order": {"importance": "first_order"},
}
WORKERS = (*METHODS, "reference", "fine")
SECTION = "## Coarse step cost"
VOCAB = 512
FIRST_WORD_ID = 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def reference_scores(
    model: torch.nn.Module, batches: list[Any], groups: dict[str, tuple[str, ...]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Exact ``Σ_b Σ_{W in group} ‖∇_W L_b‖₂`` by plain autograd, one batch at a time; also the smallest
    ``‖∇_W L_b‖₂`` over the batches of every tensor."""
    parameters = dict(model.named_parameters())
    totals = dict.fromkeys(groups, 0.0)
    smallest: dict[str, float] = {}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        captioning_loss(model, batch).backward()
        for group, names in groups.items():
            for name in names:
                norm = float(parameters[name].grad.double().norm())
                totals[group] += norm
                smallest[name] = min(norm, smallest.get(name, norm))
    model.zero_grad(set_to_none=True)
    return totals, smallest


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model, batches = build(args)
    rss_before = _rss_bytes()
    if args.worker in METHODS:
        scores = _scores(model, batches, args, **METHODS[args.worker])
        return {"scores": scores.scores, "stats": scores.stats.to_dict(), "rss_before": rss_before}
    if args.worker == "reference":
        groups = _scores(model, batches, args, importance="first_order").groups
        started = time.perf_counter()
        scores, smallest = reference_scores(model, batches, groups)
        return {"scores": scores, "tensor_norms": smallest, "seconds": time.perf_counter() - started}
    dense = []
    with torch.no_grad():
        for _ in range(3):
            started = time.perf_counter()
            losses = [float(captioning_loss(model, batch)) for batch in batches]
            dense.append(time.perf_counter() - started)
    config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=args.samples)
    result = prune(model, batches, captioning_loss, config)
    return {
        "dense_seconds": sorted(dense)[1],
        "losses": losses,
        "fine": result.stages["fine"].to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "candidates": sum(result.sizes.values()),
        "tensors": len(result.sizes),
        "groups": len(result.groups),
        "towers": {tower: list(groups) for tower, groups in result.towers.items()},
    }


def _spawn(worker: str, argv: list[str]) -> dict[str, Any]:
    logger.info("Running %s in a fresh process", worker)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", worker], check=True, capture_output=True, text=True
    )
    logger.info("%s done in %.1f s", worker, time.perf_counter() - started)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "n/a"


def render(args: argparse.Namespace, argv: list[str], results: dict[str, Any], load: tuple[str, str]) -> str:
    fine, reference = results["fine"], results["reference"]["scores"]
    mib = 1024 * 1024

    def rho(scores: dict[str, float], groups: list[str]) -> str:
        return f"{spearmanr([scores[g] for g in groups], [reference[g] for g in groups]).statistic:.3f}"

    rows = []
    for method in METHODS:
        data = results[method]
        stats = data["stats"]
        per_tower = " | ".join(rho(data["scores"], groups) for groups in fine["towers"].values())
        zeros = sum(score == 0.0 for score in data["scores"].values())
        rows.append(
            f"| {method} | {stats['full_forwards']} | {stats['backward_passes']} | {stats['seconds']:.1f} | "
            f"{stats['peak_memory_bytes'] / mib:.0f} | {(stats['peak_memory_bytes'] - data['rss_before']) / mib:.0f} | "
            f"{rho(data['scores'], sorted(reference))} | {per_tower} | {zeros} |"
        )
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
    ratio = fine["fine"]["seconds"] / fine["dense_seconds"]
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
            "| coarse step | full forwards | backward passes | wall s | peak RSS MiB | RSS growth MiB | Spearman ρ |"
            + tower_columns
            + " groups scored 0 |",
            "|---|---|---|---|---|---|---|" + "---|" * (len(fine["towers"]) + 1),
            *rows,
            "",
            "Spearman ρ: rank correlation over all groups (blocks), then within each tower, with the exact reference "
            "Σ_batches Σ_tensors ‖∇_W L‖₂ from autograd (what the per-tensor zeroth-order probe estimates, times "
            "sqrt(2/π)); all three use `score=grad_only`, `aggregate=sum`, one probe per batch, ε = 1e-3. First order "
            "sums |g| elementwise (an L1 norm), per-block probes measure the norm of the whole block's gradient. "
            "Peak RSS is the resident set of the whole process (Python, torch, model, data); RSS growth is the peak "
            "minus the resident set once the model and data were loaded.",
            "",
            f"Precision floor: the fp32 loss (≈ {sum(fine['losses']) / len(fine['losses']):.2f}) changes in steps "
            f"of one ulp, so a two-point probe resolves |ĝ| only down to ulp(L)/(2ε) ≈ {floor:.1e}; smaller "
            "estimates come out as 0 or as a multiple of that step. The exact per-tensor, per-batch gradient norms "
            f"‖∇_W L_b‖₂ (the scale of |ĝ|) range over: {norm_ranges}.",
            "",
            f"Fine step (Wanda, uniform 50%, {args.samples} samples): {fine['fine']['seconds']:.1f} s = "
            f"{ratio:.1f}x one dense forward pass over the same calibration data ({fine['dense_seconds']:.2f} s); "
            f"{fine['fine']['full_forwards']} full forwards (stopped at each tower's last block) and "
            f"{fine['fine']['block_forwards']} block forwards.",
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
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (coarse and fine)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
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
    results = {worker: _spawn(worker, argv) for worker in ("fine", "reference", *METHODS)}
    section = render(args, argv, results, (load_before, _load_average()))
    sys.stdout.write(section + "\n")
    if args.write is not None:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
