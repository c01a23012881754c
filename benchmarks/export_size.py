"""Size on disk of a pruned model in each save format: dense vs ``sparse-bitmask`` vs ``sparse-24-bitmask``.

A random LLaMA-shaped model (``--hidden``, ``--layers``; bf16 by default, as checkpoints ship) is pruned by weight
magnitude on every Linear weight of its decoder layers (the candidates the pipeline prunes): 50% unstructured per
row, and 2:4. Each pruned model is written with ``write_pruned_model`` in every format that fits its masks, and read
back with ``load_pruned_state_dict`` to check that every tensor comes back equal. Sizes are those of the weight files
(``model*.safetensors``); the masks of the dense format (``masks/pruning_masks.safetensors``) are listed apart.

Usage::

    python benchmarks/export_size.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from _results import publish_section
from transformers import LlamaConfig, LlamaForCausalLM

from ecoflap_pl.export import load_pruned_state_dict, write_pruned_model
from ecoflap_pl.export.checkpoint import MASKS_FILE
from ecoflap_pl.pruning.masks import apply_mask_, magnitude_scores, nm_mask, row_mask

logger = logging.getLogger("export_size")
SECTION = "## Size on disk of the save formats"
PATTERNS = {"50% unstructured": ("dense", "sparse-bitmask"), "2:4": ("dense", "sparse-bitmask", "sparse-24-bitmask")}


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()


def prune_(model: LlamaForCausalLM, pattern: str) -> dict[str, torch.Tensor]:
    masks = {}
    for name, weight in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            scores = magnitude_scores(weight.detach().float())
            masks[name] = nm_mask(scores, 2, 4) if pattern == "2:4" else row_mask(scores, 0.5)
            apply_mask_(weight, masks[name])
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for pattern, formats in PATTERNS.items():
        model = build(args)
        masks = prune_(model, pattern)
        pruned_share = sum(model.get_parameter(n).numel() for n in masks) / sum(p.numel() for p in model.parameters())
        expected = model.state_dict()
        for save_format in formats:
            with tempfile.TemporaryDirectory() as folder:
                saved = write_pruned_model(model, folder, masks, save_format)
                state_dict, _ = load_pruned_state_dict(folder)
                assert all(
                    torch.equal(state_dict[name], tensor) for name, tensor in expected.items() if name in state_dict
                )
                masks_bytes = (Path(folder) / MASKS_FILE).stat().st_size if save_format == "dense" else 0
            rows.append((pattern, save_format, saved.weights_bytes, saved.dense_bytes, masks_bytes, pruned_share))
            logger.info(
                "%s, %s: %.1f MB (dense %.1f MB)",
                pattern,
                save_format,
                saved.weights_bytes / 1e6,
                saved.dense_bytes / 1e6,
            )
    params = sum(p.numel() for p in build(args).parameters())
    lines = [
        SECTION,
        "",
        f"`python benchmarks/export_size.py` (CPU): a random LLaMA-shaped model, hidden {args.hidden}, {args.layers} "
        f"layers, vocabulary {args.vocab}, {params / 1e6:.0f} M parameters in {args.dtype}; magnitude masks on the "
        f"decoder layers' Linear weights ({100 * rows[0][5]:.0f}% of the parameters; embeddings and head stay "
        "dense, as the pipeline leaves them). Every format read back equal to the pruned model.",
        "",
        "| masks | save_format | weights on disk | vs dense | masks file |",
        "|---|---|---:|---:|---:|",
    ]
    for pattern, save_format, weights, dense, masks_bytes, _ in rows:
        masks_text = f"{masks_bytes / 1e6:.1f} MB" if masks_bytes else "(in the bitmask)"
        lines.append(
            f"| {pattern} | {save_format} | {weights / 1e6:.1f} MB | {100 * weights / dense:.0f}% | {masks_text} |"
        )
    section = "\n".join(lines) + "\n"
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
