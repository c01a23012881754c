"""Forward latency and throughput of a 2:4-pruned full-size BLIP-2 OPT-2.7B: dense weights vs 2:4 sparse kernels.

The random BLIP-2 of ``full_size.py`` (the dimensions of ``Salesforce/blip2-opt-2.7b``, built on the GPU in bf16) is
pruned 2:4 by magnitude on the candidate weights the pipeline prunes (vision and language towers, not the Q-Former),
then timed, in one process on one GPU:

1. the whole model (image + prompt tokens, one forward), with the masked dense weights;
2. the language model alone (``model.language_model`` on token ids), dense;
3. both again after ``to_semi_structured_`` swapped the pruned Linear weights for semi-structured sparse tensors.

Outputs of the sparse run are compared with the dense run (max abs difference of the logits). Each timing is the
median of ``--repeats`` forwards after ``--warmup`` ones; throughput is samples per second at ``--batch-size``.

Usage::

    python benchmarks/sparse_speed.py --batch-size 16 --write benchmarks/RESULTS.md

Without a CUDA GPU of compute capability 8.0+ it says so and exits with status 2: the kernels exist only there.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _results import publish_section
from full_size import FIRST_WORD_ID, SCALES, blip2_config, build_model

from ecoflap_pl.export.semi_structured import check_semi_structured, to_semi_structured_
from ecoflap_pl.pruning import PruningConfig
from ecoflap_pl.pruning.discovery import find_candidates, find_stacks
from ecoflap_pl.pruning.masks import apply_mask_, nm_mask

logger = logging.getLogger("sparse_speed")
SECTION = "## 2:4 sparse kernels: forward speed on a GPU"


def median_seconds(forward: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        forward()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prune_two_four_(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """2:4 masks by weight magnitude on the pipeline's default candidates, applied in place."""
    config = PruningConfig(structure="2:4", importance="uniform")
    stacks = find_stacks(model)
    masks = {}
    for candidate in find_candidates(model, stacks, config):
        weight = model.get_parameter(candidate.name)
        masks[candidate.name] = nm_mask(weight.detach().float().abs(), 2, 4)
        apply_mask_(weight, masks[candidate.name])
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_semi_structured("2:4", device)
    except ValueError as error:  # no CUDA GPU, or one without sparse tensor cores
        logger.error("sparse_speed needs a GPU: %s", error)
        sys.exit(2)

    spec = SCALES[args.scale]
    model = build_model(blip2_config(args.scale), device, torch.bfloat16)
    masks = prune_two_four_(model)
    generator = torch.Generator().manual_seed(0)
    queries, vocab = spec["num_query_tokens"], spec["text"]["vocab_size"]
    input_ids = torch.randint(FIRST_WORD_ID, vocab, (args.batch_size, queries + args.text_tokens), generator=generator)
    input_ids[:, :queries] = spec["image_token_id"]
    image_size = spec["vision"]["image_size"]
    pixels = torch.randn(args.batch_size, 3, image_size, image_size, generator=generator)
    batch = {"pixel_values": pixels.to(device, torch.bfloat16), "input_ids": input_ids.to(device)}
    text_ids = input_ids[:, queries:].to(device)

    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for kernels in ("dense", "2:4 sparse"):
            if kernels == "2:4 sparse":
                swapped = to_semi_structured_(model, masks)
                logger.info("%d of %d pruned weights on sparse kernels", len(swapped), len(masks))
            runs = {
                "BLIP-2 (image + text)": lambda: model(**batch).logits,
                "language model alone": lambda: model.language_model(input_ids=text_ids).logits,
            }
            for part, forward in runs.items():
                seconds = median_seconds(forward, args.warmup, args.repeats)
                results.setdefault(part, {})[kernels] = seconds
                outputs[f"{part}/{kernels}"] = forward().float()
                logger.info("%s, %s: %.2f ms", part, kernels, 1e3 * seconds)

    gpu = torch.cuda.get_device_name(device)
    lines = [
        SECTION,
        "",
        f"`python benchmarks/sparse_speed.py --batch-size {args.batch_size} --text-tokens {args.text_tokens}` on one "
        f"{gpu}, torch {torch.__version__}, bf16, random BLIP-2 OPT-2.7B weights pruned 2:4 by magnitude (vision and "
        f"language towers). Median of {args.repeats} forwards.",
        "",
        "| forward | dense ms | 2:4 sparse ms | speed-up | samples/s dense | samples/s 2:4 | max abs Δ logits |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for part, seconds in results.items():
        difference = (outputs[f"{part}/dense"] - outputs[f"{part}/2:4 sparse"]).abs().max().item()
        dense, sparse = seconds["dense"], seconds["2:4 sparse"]
        lines.append(
            f"| {part} | {1e3 * dense:.1f} | {1e3 * sparse:.1f} | {dense / sparse:.2f}× | "
            f"{args.batch_size / dense:.0f} | {args.batch_size / sparse:.0f} | {difference:.3g} |"
        )
    section = "\n".join(lines) + "\n"
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
