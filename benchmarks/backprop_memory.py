"""Memory and time of the back-propagated coarse step, keeping autograd's activations or recomputing each block.

A seeded random LLaMA-shaped model (long sequences, so that activations outweigh the weights, as for a 7B model on
hundreds of image and text tokens) is scored by ``first_order`` and ``gradient_norm`` with
``activation_storage: auto`` (autograd keeps what it saves) and ``recompute`` (every block checkpointed), each in a
fresh process so that its peak resident memory is its own. Reported per row: wall time, blocks run again during
backward, the bytes kept from the forward for backward per batch (weights excluded): what autograd saves outside
checkpointed blocks (counted through a saved-tensor hook) plus, with ``recompute``, the inputs each checkpointed
block holds; the process's peak resident memory above the model and data, and whether the scores equal
those of ``auto``. A no-grad forward over the same batches gives the inference floor.

Usage::

    python benchmarks/backprop_memory.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch
from _results import publish_section
from transformers import LlamaConfig, LlamaForCausalLM

from ecoflap_pl import PruningConfig, score_groups
from ecoflap_pl.pruning.block_outputs import stack_blocks, tensor_leaves
from ecoflap_pl.pruning.monitor import StageMonitor, resident_bytes

SECTION = "## Back-propagated coarse step: keeping activations or recomputing blocks"
ROWS: dict[str, dict[str, str]] = {
    "forward only (no grad)": {},
    "first_order, auto": {"importance": "first_order", "activation_storage": "auto"},
    "first_order, recompute": {"importance": "first_order", "activation_storage": "recompute"},
    "gradient_norm, auto": {"importance": "gradient_norm", "activation_storage": "auto"},
    "gradient_norm, recompute": {"importance": "gradient_norm", "activation_storage": "recompute"},
}
MIB = 2**20


def _config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.tokens,
    )


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args)).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, args.vocab, (args.batch_size, args.tokens), generator=generator)}
        for _ in range(args.batches)
    ]
    settings = ROWS[args.worker]
    before = resident_bytes()
    if not settings:
        with StageMonitor(torch.device("cpu")) as monitor, torch.no_grad():
            for batch in batches:
                _loss(model, batch)
        stats = monitor.stats.to_dict()
        return {"stats": stats, "rss_before": before, "kept_bytes": 0, "scores": None}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: set[int] = set()  # storages of the block inputs counted in the current forward
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        if tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() not in weights:
            kept += tensor.numel() * tensor.element_size()
        return tensor

    def block_inputs(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # what a checkpointed block keeps for backward: its inputs (each storage once per forward; the engine's
        # discovery forward runs without grad and keeps nothing)
        nonlocal kept
        if not torch.is_grad_enabled():
            return
        for tensor in tensor_leaves((args, kwargs)):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights and storage.data_ptr() not in held:
                held.add(storage.data_ptr())
                kept += storage.nbytes()

    def measured_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        held.clear()
        return _loss(model, batch)

    config = PruningConfig(
        sparsity=0.5, coarse_samples=args.batches * args.batch_size, probe_granularity="per_tensor", **settings
    )
    blocks = stack_blocks(model).values() if settings["activation_storage"] == "recompute" else []
    hooks = [block.register_forward_pre_hook(block_inputs, with_kwargs=True) for block in blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scores = score_groups(model, batches, measured_loss, config)
    for hook in hooks:
        hook.remove()
    return {
        "stats": scores.stats.to_dict(),
        "rss_before": before,
        "kept_bytes": kept // args.batches,
        "scores": scores.scores,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _worker_args(args: argparse.Namespace, row: str) -> list[str]:
    sizes = ("vocab", "hidden", "intermediate", "layers", "heads", "tokens", "batch_size", "batches", "threads")
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in sizes]
    return [sys.executable, __file__, "--worker", row, *options]


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    floor = results["forward only (no grad)"]["stats"]
    lines = [
        "| coarse step | wall s | blocks run again in backward | kept for backward per batch MiB | peak RSS growth MiB "
        "| scores equal to `auto`'s |",
        "|---|---|---|---|---|---|",
    ]
    for row, data in results.items():
        stats = data["stats"]
        growth = (stats["peak_memory_bytes"] - data["rss_before"]) / MIB
        if data["scores"] is None:
            lines.append(f"| {row} | {stats['seconds']:.1f} | 0 | 0 | {growth:.0f} | |")
            continue
        reference = results[row.replace("recompute", "auto")]["scores"]
        equal = "yes, bit for bit" if data["scores"] == reference else "no"
        lines.append(
            f"| {row} | {stats['seconds']:.1f} | {stats['block_forwards']} | {data['kept_bytes'] / MIB:.0f} "
            f"| {growth:.0f} | {equal if row.endswith('recompute') else ''} |"
        )
    parameters = next(d["parameters"] for d in results.values() if "parameters" in d)
    return "\n".join(
        [
            *lines,
            "",
            f"Model: random-init `LlamaForCausalLM`, hidden {args.hidden}, {args.layers} layers, MLP "
            f"{args.intermediate}, {args.heads} heads ({args.heads // 2} key/value heads), vocabulary {args.vocab}: "
            f"{parameters / 1e6:.1f} M parameters ({parameters * 4 / MIB:.0f} MiB in fp32). Calibration: "
            f"{args.batches} batches of {args.batch_size} x {args.tokens} tokens; loss = causal LM loss. The no-grad "
            f"forward over them took {floor['seconds']:.1f} s.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", default=None, help="markdown file whose section is (re)written")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    started = time.time()
    load = os.getloadavg()
    results = {}
    for row in ROWS:
        output = subprocess.run(_worker_args(args, row), check=True, capture_output=True, text=True).stdout
        results[row] = json.loads(output.strip().splitlines()[-1])
        print(f"{row}: {results[row]['stats']['seconds']:.1f} s", file=sys.stderr, flush=True)
    command = "python benchmarks/backprop_memory.py " + " ".join(sys.argv[1:])
    section = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command.strip()}`, {(time.time() - started) / 60:.1f} min",
            "",
            f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU, {args.threads} torch thread(s), fp32; "
            f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; torch {torch.__version__}. Each row "
            "ran in a fresh process.",
            "",
            table(results, args),
            "",
        ]
    )
    publish_section(section, SECTION, args.write)


if __name__ == "__main__":
    main()
