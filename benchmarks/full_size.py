"""What the pruning engine costs on a full-size BLIP-2 OPT-2.7B or FlanT5-XL on one GPU.

A ``Blip2ForConditionalGeneration`` with the dimensions of ``Salesforce/blip2-opt-2.7b`` (EVA ViT-g/14 with 39
layers, BERT-base-sized Q-Former, OPT-2.7B decoder: 3.9 B parameters) or of ``Salesforce/blip2-flan-t5-xl`` (the
same ViT and Q-Former, the FlanT5-XL encoder-decoder: 24 + 24 blocks of width 2048; the paper's main model) is
built at random, directly on the device in the chosen dtype, without downloading anything. The Q-Former and the
query tokens are then put back in fp32, as ``from_pretrained`` does (``_keep_in_fp32_modules``). The calibration
data is random and seeded: N(0, 1) images and random caption tokens behind the 32 image tokens; the loss is the
model's own prefix-LM captioning loss (FlanT5: the first half of the caption goes to the encoder behind the image
tokens, the second half is the decoder's target).

Each method runs in its own fresh process (so the peak GPU memory is that method's), at 50% sparsity:

- ECoFLaP zeroth-order + Wanda (the default ``PruningConfig``: one probe per weight tensor per batch, prefix reuse
  and up to 8 probes per forward), the same with up to 32 probes per forward (``max_probe_replicas``; the memory
  left still bounds it), and with the plain loop (one full forward per probe) for comparison,
- ECoFLaP first-order + Wanda (also with ``activation_storage="recompute"``: every block checkpointed), and ECoFLaP +
  Wanda on ``importance="gradient_norm"`` (the zeroth-order scores' expectation by back-propagation);
  ``gpu_session.py`` leaves the last two out to fit its 10 minutes,
- uniform Wanda (stacked block replays, the default, and one calibration batch per replay), uniform SparseGPT and
  magnitude pruning.

Every worker also times the model build and one dense forward + loss over one calibration batch, and evaluates the
loss before and after pruning on the first calibration batch and on one held-out batch. A worker with a coarse step
first takes the exact per-tensor gradient norms on the coarse batches by autograd (``_reference.py``) and reports the
Spearman ρ of its block scores against them, over all blocks and within each tower. By default the coarse step
gets as many calibration samples as fit ``--coarse-seconds`` at the measured forward time (at most 32, the
official BLIP-2 setting); the first worker decides it, and every later worker uses the same number.

Progress goes to stderr as it happens, the JSON (``--json``) and the markdown section (``--write``) are rewritten
after every method, so a run that is killed still leaves its finished methods behind.

Usage::

    python benchmarks/full_size.py --json /tmp/full_size.json --write benchmarks/RESULTS.md
    python benchmarks/full_size.py --scale flant5_xl --json /tmp/flant5.json --write benchmarks/RESULTS.md
    python benchmarks/full_size.py --scale tiny --device cpu --dtype float32   # a smoke check on the CPU
    python benchmarks/full_size.py --scale flant5_tiny --device cpu --dtype float32
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
import tempfile
import time
from typing import Any

import torch
import transformers
from _reference import block_reference, exact_gradient_norms, group_spearman
from _results import (
    GIB,
    check_run_args,
    dump_json,
    format_count,
    format_size,
    progress_printer,
    seeded_random_model,
    write_section,
)
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.discovery import build_groups, find_candidates, find_stacks
from ecoflap_pl.pruning.monitor import StageMonitor

logger = logging.getLogger("full_size")
SECTIONS = {"opt": "## Full-size BLIP-2 OPT-2.7B on a GPU", "t5": "## Full-size BLIP-2 FlanT5-XL on a GPU"}
METHODS: dict[str, dict[str, Any]] = {
    "zeroth_order": {"importance": "zeroth_order", "method": "wanda"},
    "zeroth_order_plain": {"importance": "zeroth_order", "method": "wanda", "activation_storage": "recompute"},
    "zeroth_order_32_replicas": {"importance": "zeroth_order", "method": "wanda", "max_probe_replicas": 32},
    "first_order": {"importance": "first_order", "method": "wanda"},
    "first_order_recompute": {"importance": "first_order", "method": "wanda", "activation_storage": "recompute"},
    "gradient_norm": {"importance": "gradient_norm", "method": "wanda"},
    "wanda": {"importance": "uniform", "method": "wanda"},
    "wanda_one_batch_replays": {"importance": "uniform", "method": "wanda", "fine_replay_batches": 1},
    "sparsegpt": {"importance": "uniform", "method": "sparsegpt"},
    "magnitude": {"importance": "uniform", "method": "magnitude"},
}
LABELS = {
    "zeroth_order": "ECoFLaP zeroth-order + Wanda",
    "zeroth_order_plain": "ECoFLaP zeroth-order (plain loop) + Wanda",
    "zeroth_order_32_replicas": "ECoFLaP zeroth-order + Wanda, up to 32 probes per forward",
    "first_order": "ECoFLaP first-order + Wanda",
    "first_order_recompute": "ECoFLaP first-order + Wanda, every block recomputed in backward",
    "gradient_norm": "ECoFLaP gradient-norm (zeroth order's expectation, by backprop) + Wanda",
    "wanda": "Wanda (uniform)",
    "wanda_one_batch_replays": "Wanda (uniform, one batch per replay)",
    "sparsegpt": "SparseGPT (uniform)",
    "magnitude": "magnitude (uniform)",
}
# Cheapest first, so that a run cut short by a wall-clock limit has the most rows; SparseGPT last, as its column-by-
# column Python loop (about 1.1 M columns at full scale) is the least predictable cost. The table keeps METHODS' order.
RUN_ORDER = (
    "magnitude",
    "wanda",
    "wanda_one_batch_replays",
    "first_order",
    "first_order_recompute",
    "gradient_norm",
    "zeroth_order",
    "zeroth_order_32_replicas",
    "zeroth_order_plain",
    "sparsegpt",
)
FIRST_WORD_ID = 8  # random caption tokens are drawn above the special ids (OPT: pad 1, bos/eos 2)
MAX_AUTO_COARSE_SAMPLES = 32  # the official BLIP-2 runs score with 32 samples
ZO_PROBE_OVERHEAD = 1.1  # a probe = two forwards plus drawing, adding and restoring one direction

SCALES: dict[str, dict[str, Any]] = {
    # Salesforce/blip2-opt-2.7b (vision and Q-Former configs) and facebook/opt-2.7b (text config).
    "full": {
        "vision": {
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
        },
        "qformer": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 1408,
        },
        "text": {
            "vocab_size": 50272,
            "hidden_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "ffn_dim": 10240,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": 2560,
            "do_layer_norm_before": True,
        },
        "num_query_tokens": 32,
        "image_token_id": 50265,  # the `<image>` token the HF blip2-opt-2.7b tokenizer appends (vocab 50272)
        "defaults": {"batch_size": 8, "text_tokens": 24, "coarse_samples": "auto", "fine_samples": 128},
    },
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "qkv_bias": True,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
        },
        "qformer": {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 64,
        },
        "text": {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 128,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 64,
            "do_layer_norm_before": True,
        },
        "num_query_tokens": 8,
        "image_token_id": 4,  # ecoflap_pl.models.tokenizers.IMAGE_ID, as the tiny test models use
        "defaults": {"batch_size": 4, "text_tokens": 16, "coarse_samples": "8", "fine_samples": 8},
    },
}
# Salesforce/blip2-flan-t5-xl: the ViT-g and Q-Former of blip2-opt-2.7b, and google/flan-t5-xl as the language model.
SCALES["flant5_xl"] = {
    **SCALES["full"],
    "language": "t5",
    "text": {
        "vocab_size": 32128,
        "d_model": 2048,
        "d_kv": 64,
        "d_ff": 5120,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": 32,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    "image_token_id": 32100,  # the `<image>` token the HF blip2-flan-t5-xl tokenizer appends (vocab 32128)
}
SCALES["flant5_tiny"] = {
    **SCALES["tiny"],
    "language": "t5",
    "text": {
        "vocab_size": 512,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
}


def blip2_config(scale: str) -> Blip2Config:
    """The BLIP-2 OPT config of ``scale``.

    The vision tower gets ``initializer_range=0.02``: BLIP-2's default (1e-10) assumes pretrained weights, and at
    1e-10 every image would embed alike and the zeroth-order perturbations would dwarf the weights.
    """
    spec = SCALES[scale]
    if spec.get("language") == "t5":
        text = T5Config(**spec["text"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    else:
        text = OPTConfig(**spec["text"], pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return Blip2Config(
        vision_config={**spec["vision"], "initializer_range": 0.02},
        qformer_config=spec["qformer"],
        text_config=text.to_dict(),
        num_query_tokens=spec["num_query_tokens"],
        image_token_id=spec["image_token_id"],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: Blip2Config, device: torch.device, dtype: torch.dtype) -> Blip2ForConditionalGeneration:
    """The seeded random model, created directly on ``device`` in ``dtype`` (no fp32 copy of the 3.9 B weights);
    Q-Former and query tokens in fp32 as ``from_pretrained`` keeps them; eval mode."""
    model = seeded_random_model(Blip2ForConditionalGeneration, config, device, dtype)
    model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters(recurse=False):
        if name in keep:
            parameter.data = parameter.data.float()
    for name, module in model.named_modules():  # e.g. "qformer", and T5's "wo" inside every feed-forward layer
        if keep.intersection(name.split(".")):
            module.float()
    with torch.no_grad():
        # HF initialises the query tokens to zeros (every query alike); trained ones are not.
        model.query_tokens.normal_(0.0, 0.02)
    return model.eval()


def make_batch(
    size: int, args: argparse.Namespace, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    spec = SCALES[args.scale]
    queries, image_id = spec["num_query_tokens"], spec["image_token_id"]
    vocab, image_size = spec["text"]["vocab_size"], spec["vision"]["image_size"]
    input_ids = torch.randint(FIRST_WORD_ID, vocab, (size, queries + args.text_tokens), generator=generator)
    input_ids[input_ids == image_id] = FIRST_WORD_ID
    input_ids[:, :queries] = image_id  # transformers 5 scatters the Q-Former outputs into these positions
    pixel_values = torch.randn(size, 3, image_size, image_size, generator=generator)
    if spec.get("language") == "t5":  # prefix LM: the caption's first half to the encoder, the rest is the target
        split = queries + max(args.prompt_tokens, args.text_tokens // 2)
        input_ids, labels = input_ids[:, :split], input_ids[:, split:].clone()
        return {
            "pixel_values": pixel_values.to(device=device, dtype=dtype),
            "input_ids": input_ids.to(device),
            "labels": labels.to(device),
        }
    labels = input_ids.clone()
    labels[:, : queries + args.prompt_tokens] = -100  # no loss on the image tokens and the prompt
    return {
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
    }


def make_batches(
    args: argparse.Namespace, samples: int, device: torch.device, dtype: torch.dtype
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Seeded calibration batches holding ``samples`` samples, and one held-out batch (identical in every worker)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, samples, args.batch_size):
        batches.append(make_batch(min(args.batch_size, samples - start), args, generator, device, dtype))
    held_out = make_batch(args.batch_size, args, torch.Generator().manual_seed(2), device, dtype)
    return batches, held_out


def captioning_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(captioning_loss(model, batch))


class _Warnings(logging.Handler):
    """Keeps the engine's warnings (e.g. zeroth-order probes that saw no change of the loss) for the JSON."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def resolve_coarse_samples(args: argparse.Namespace, forward_seconds: float, units: int) -> int:
    """``--coarse-samples``, or with ``auto`` the most whole batches (at most 32 samples) whose per-unit
    zeroth-order probes (2 forwards per unit per batch) fit ``--coarse-seconds``."""
    if args.coarse_samples != "auto":
        return int(args.coarse_samples)
    per_batch = 2 * units * forward_seconds * ZO_PROBE_OVERHEAD
    most = max(1, MAX_AUTO_COARSE_SAMPLES // args.batch_size)
    return args.batch_size * min(most, max(1, int(args.coarse_seconds // per_batch)))


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build, measure the dense model, prune with one method, measure the pruned model."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    warnings = _Warnings()
    logging.getLogger("ecoflap_pl").addHandler(warnings)
    settings = METHODS[args.worker]
    out: dict[str, Any] = {"method": args.worker, "settings": settings, "warnings": warnings.messages}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        out["device"] = {"name": properties.name, "memory_bytes": properties.total_memory, "cuda": torch.version.cuda}
    else:
        out["device"] = {"name": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"}

    config = blip2_config(args.scale)
    with StageMonitor(device) as monitor:
        model = build_model(config, device, dtype)
        _sync(device)
    parameters = list(model.parameters())
    candidates = find_candidates(model, find_stacks(model), PruningConfig(sparsity=args.sparsity))
    groups = build_groups(candidates, "block")
    out["model"] = {
        "build": monitor.stats.to_dict(),
        "parameters": sum(p.numel() for p in parameters),
        "weight_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "fp32_parameters": sum(p.numel() for p in parameters if p.dtype == torch.float32),
        "weights_allocated_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
        "candidate_tensors": len(candidates),
        "candidate_parameters": sum(c.numel for c in candidates),
        "groups": len(groups),
        "towers": {c.stack: sum(1 for g in groups.values() if g[0].startswith(c.stack + ".")) for c in candidates},
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    print(
        f"[{args.worker}] built {format_count(out['model']['parameters'])} parameters in "
        f"{monitor.stats.seconds:.1f} s; {len(candidates)} candidate tensors in {len(groups)} blocks",
        file=sys.stderr,
        flush=True,
    )

    most_coarse = MAX_AUTO_COARSE_SAMPLES if args.coarse_samples == "auto" else int(args.coarse_samples)
    batches, held_out = make_batches(args, max(most_coarse, args.fine_samples), device, dtype)
    dense_loss = _loss(model, batches[0])  # warm-up (cuBLAS, kernels) and the dense loss
    times = []
    with StageMonitor(device) as monitor:
        for _ in range(args.repeats):
            started = time.perf_counter()
            _loss(model, batches[0])
            times.append(time.perf_counter() - started)
    forward_seconds = statistics.median(times)
    out["dense"] = {
        "forward_seconds": forward_seconds,
        "forward_seconds_all": times,
        "forward": monitor.stats.to_dict(),
        "loss": dense_loss,
        "held_out_loss": _loss(model, held_out),
    }
    units = len(candidates) if args.probe_granularity == "per_tensor" else len(groups)
    coarse_samples = resolve_coarse_samples(args, forward_seconds, units)
    out["coarse_samples"], out["fine_samples"] = coarse_samples, args.fine_samples
    coarse_batches = -(-coarse_samples // args.batch_size)
    estimate = ""
    if settings["importance"] == "zeroth_order":
        estimate = f"; zeroth-order coarse step ≈ {2 * units * coarse_batches * forward_seconds:.0f} s of forwards"
    print(
        f"[{args.worker}] dense forward + loss over {args.batch_size} samples: {forward_seconds * 1e3:.0f} ms, "
        f"peak {monitor.stats.peak_memory_bytes / GIB:.2f} GiB, loss {dense_loss:.4f}; coarse samples "
        f"{coarse_samples} ({coarse_batches} batches){estimate}",
        file=sys.stderr,
        flush=True,
    )

    tensor_norms = None
    if settings["importance"] != "uniform":
        started = time.perf_counter()
        names = [c.name for c in candidates]
        tensor_norms = exact_gradient_norms(model, batches[:coarse_batches], captioning_loss, names)
        out["reference_seconds"] = time.perf_counter() - started

    pruning = PruningConfig(
        sparsity=args.sparsity,
        coarse_samples=coarse_samples,
        fine_samples=args.fine_samples,
        probe_granularity=args.probe_granularity,
        seed=0,
        **settings,
    )
    started = time.perf_counter()
    result = prune(model, batches, captioning_loss, pruning, progress=progress_printer(started))
    prune_seconds = time.perf_counter() - started
    pruned_loss, pruned_held_out = _loss(model, batches[0]), _loss(model, held_out)
    out["prune"] = {
        "config": pruning.to_dict(),
        "seconds": prune_seconds,
        "stages": {stage: stats.to_dict() for stage, stats in result.stages.items()},
        "overall_sparsity": result.overall_sparsity,
        "tower_sparsity": result.tower_sparsity(),
        "skipped_stacks": list(result.skipped_stacks),
    }
    if tensor_norms is not None:
        reference = block_reference(tensor_norms, result.groups)
        out["spearman"] = {
            "all": group_spearman(result.group_scores, reference, result.groups),
            **{
                tower: group_spearman(result.group_scores, reference, groups) for tower, groups in result.towers.items()
            },
        }
    out["pruned"] = {
        "loss": pruned_loss,
        "held_out_loss": pruned_held_out,
        "finite": math.isfinite(pruned_loss) and math.isfinite(pruned_held_out),
    }
    print(
        f"[{args.worker}] pruned to {result.overall_sparsity:.4f} sparsity in {prune_seconds:.1f} s; loss "
        f"{dense_loss:.4f} -> {pruned_loss:.4f} (held out {out['dense']['held_out_loss']:.4f} -> "
        f"{pruned_held_out:.4f})",
        file=sys.stderr,
        flush=True,
    )
    return out


def _spawn(method: str, argv: list[str], coarse_samples: int | None) -> dict[str, Any]:
    """Run one method in a fresh process; its progress streams through, its numbers come back in a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        extra = ["--coarse-samples", str(coarse_samples)] if coarse_samples is not None else []
        command = [sys.executable, __file__, *argv, *extra, "--worker", method, "--result-file", path]
        started = time.perf_counter()
        completed = subprocess.run(command, check=False)
        seconds = time.perf_counter() - started
        if completed.returncode != 0 or not os.path.exists(path):
            return {"method": method, "error": f"worker exited with status {completed.returncode}", "wall": seconds}
        with open(path) as handle:
            data = json.load(handle)
    data["wall"] = seconds
    return data


def _stage(data: dict[str, Any], stage: str, key: str) -> float:
    return data["prune"]["stages"].get(stage, {}).get(key, 0)


def _row(method: str, data: dict[str, Any]) -> str:
    if "error" in data:
        return f"| {LABELS[method]} | failed: {data['error']} |" + " |" * 11
    stages = data["prune"]["stages"].values()
    full = sum(s["full_forwards"] for s in stages)
    block = sum(s["block_forwards"] for s in stages)
    backward = sum(s["backward_passes"] for s in stages)
    peak = max(s["peak_memory_bytes"] for s in stages)
    coarse = f"{_stage(data, 'coarse', 'seconds'):.1f}" if "coarse" in data["prune"]["stages"] else "–"
    rho = data.get("spearman")
    ranking = f"{rho['all']:.2f} ({' / '.join(f'{v:.2f}' for k, v in rho.items() if k != 'all')})" if rho else "–"
    finite = "" if data["pruned"]["finite"] else " (not finite!)"
    return (
        f"| {LABELS[method]} | {coarse} | {_stage(data, 'fine', 'seconds'):.1f} | "
        f"{sum(s['seconds'] for s in stages):.1f} | {full} + {block} | {backward} | {peak / GIB:.2f} | "
        f"{data['prune']['overall_sparsity']:.4f} | {data['dense']['loss']:.4f} | "
        f"{data['pruned']['loss']:.4f}{finite} | {data['dense']['held_out_loss']:.4f} → "
        f"{data['pruned']['held_out_loss']:.4f} | {ranking} | {data['wall']:.0f} |"
    )


def _language(spec: dict[str, Any]) -> str:
    text = spec["text"]
    if spec.get("language") == "t5":
        return (
            f"FlanT5 {text['num_layers']} + {text['num_decoder_layers']} x {text['d_model']} (ffn {text['d_ff']}, "
            f"vocab {text['vocab_size']})"
        )
    return (
        f"OPT {text['num_hidden_layers']} x {text['hidden_size']} (ffn {text['ffn_dim']}, vocab {text['vocab_size']})"
    )


def render(args: argparse.Namespace, argv: list[str], results: dict[str, Any], planned: list[str]) -> str:
    done = {m: d for m, d in results["methods"].items() if "error" not in d}
    command = " ".join(["python", "benchmarks/full_size.py", *argv])
    section = SECTIONS[SCALES[args.scale].get("language", "opt")]
    lines = [section, "", f"Command: `{command}`", ""]
    if len(results["methods"]) < len(planned):
        lines += [f"**Partial: {len(results['methods'])} of {len(planned)} methods done.**", ""]
    if not done:
        failed = "; ".join(f"{LABELS[m]}: {d['error']}" for m, d in results["methods"].items())
        return "\n".join([*lines, f"No method finished ({failed}).", ""])
    first = done[next(iter(done))]
    model, dense = first["model"], first["dense"]
    cuda = args.device == "cuda"
    memory = "GPU" if cuda else "RSS"
    spec = SCALES[args.scale]
    vision, qformer = spec["vision"], spec["qformer"]
    towers = ", ".join(f"{tower} ({count} blocks)" for tower, count in model["towers"].items())
    towers_order = [tower.split(".")[0] for tower in model["towers"]]
    coarse = first["coarse_samples"]
    how = (
        f"chosen from the measured forward time to fit {args.coarse_seconds:g} s of zeroth-order probes, at most "
        f"{MAX_AUTO_COARSE_SAMPLES}"
        if args.coarse_samples == "auto"
        else "as given"
    )
    lines += [
        f"Machine: {first['device']['name']}"
        + (f" ({first['device']['memory_bytes'] / GIB:.0f} GiB, CUDA {first['device']['cuda']})" if cuda else "")
        + f"; torch {torch.__version__}, transformers {transformers.__version__}; {args.dtype} weights "
        "(Q-Former and query tokens fp32, as `from_pretrained` keeps them), attention "
        f"`{model['attn_implementation']}`.",
        "",
        f"Model ({args.scale} scale): random-init `Blip2ForConditionalGeneration`: ViT {vision['num_hidden_layers']} x "
        f"{vision['hidden_size']} ({vision['image_size']}px, patch {vision['patch_size']}), Q-Former "
        f"{qformer['num_hidden_layers']} x {qformer['hidden_size']}, {_language(spec)}, "
        f"{spec['num_query_tokens']} query tokens: {format_count(model['parameters'])} parameters, "
        f"{format_size(model['weight_bytes'])} of weights; "
        f"built on the device in {model['build']['seconds']:.1f} s. Candidates: "
        f"{format_count(model['candidate_parameters'])} parameters in {model['candidate_tensors']} weight tensors, "
        f"{model['groups']} blocks ({towers}); the Q-Former is never pruned.",
        "",
        f"Calibration: random seeded batches of {args.batch_size} samples ({spec['num_query_tokens']} image tokens + "
        f"{args.text_tokens} caption tokens, {args.prompt_tokens} of them prompt without loss); coarse step "
        f"{coarse} samples ({how}), fine step {args.fine_samples} samples; sparsity {args.sparsity:g}; "
        f"probes per {args.probe_granularity.replace('per_', '')}. One dense forward + loss over one batch: "
        f"{dense['forward_seconds'] * 1e3:.0f} ms (median of {len(dense['forward_seconds_all'])}), peak "
        f"{memory} {dense['forward']['peak_memory_bytes'] / GIB:.2f} GiB"
        + (f" ({model['weights_allocated_bytes'] / GIB:.2f} GiB of it weights)." if cuda else "."),
        "",
        f"| method | coarse s | fine s | total s | forwards (full + block) | backward | peak {memory} GiB | "
        "achieved sparsity | dense loss | pruned loss | held-out loss dense → pruned | Spearman ρ (towers) | "
        "worker wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(method, results["methods"][method]) for method in METHODS if method in results["methods"]),
        "",
        "Seconds, forwards and peak memory are the engine's own per-stage records (`PruningResult.stages`); total = "
        "discovery + coarse + fine. Peak memory is "
        + (
            "`torch.cuda.max_memory_allocated` (weights included) over the stage, reset at its start; "
            if cuda
            else "the process's resident set; "
        )
        + "each method ran in a fresh process. Worker wall time includes starting Python, building the model, the "
        "dense measurements and the loss evaluations. Losses are the captioning loss on the first calibration batch "
        "and on a held-out batch; a random model's are near ln(vocab), so they only show the pruned model still "
        "runs and stays finite, not its quality. Spearman ρ ranks the method's block scores against the exact "
        "Σ_batches Σ_tensors ‖∇_W L_b‖₂ (autograd on the same coarse batches and dense model, taken in the worker "
        "before pruning, outside the stage records), over all blocks, then within each tower "
        f"({' / '.join(towers_order)}).",
        "",
    ]
    notes = [
        f"- {LABELS[m]}: {len(d['warnings'])} engine warning(s): {d['warnings'][0][:400]}"
        for m, d in done.items()
        if d["warnings"]
    ]
    return "\n".join([*lines, *(notes + [""] if notes else [])])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale",
        choices=tuple(SCALES),
        default="full",
        help="full BLIP-2 OPT-2.7B, full BLIP-2 FlanT5-XL (flant5_xl), or a tiny one of either",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=None, help="calibration batch size (full 8, tiny 4)")
    parser.add_argument("--text-tokens", type=int, default=None, help="caption tokens after the image tokens")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="leading caption tokens without loss")
    parser.add_argument("--coarse-samples", default=None, help="coarse-step samples or 'auto' (full-scale default)")
    parser.add_argument(
        "--coarse-seconds", type=float, default=100.0, help="with --coarse-samples auto: zeroth-order coarse budget"
    )
    parser.add_argument("--fine-samples", type=int, default=None, help="fine-step samples (full 128, tiny 8)")
    parser.add_argument("--probe-granularity", choices=("per_tensor", "per_block"), default="per_tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timed dense forwards (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on the CPU)")
    parser.add_argument("--write", default=None, help="markdown file whose full-size section is (re)written")
    parser.add_argument("--json", default=None, help="JSON file of every raw number, rewritten after each method")
    parser.add_argument("--worker", choices=tuple(METHODS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in SCALES[args.scale]["defaults"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.coarse_samples != "auto" and not (str(args.coarse_samples).isdigit() and int(args.coarse_samples) > 0):
        parser.error(f"--coarse-samples must be a positive integer or 'auto', got {args.coarse_samples!r}")
    check_run_args(parser, args, ("batch_size", "fine_samples", "repeats"))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.worker is not None:
        data = run_worker(args)
        with open(args.result_file, "w") as handle:
            json.dump(data, handle)
        return
    planned = [method for method in RUN_ORDER if method in args.methods]
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/full_size.py", *argv]),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version},
        "methods": {},
    }
    coarse_samples = None
    started = time.perf_counter()
    for method in planned:
        print(f"=== {method} ({LABELS[method]}), {time.perf_counter() - started:.0f} s into the run", flush=True)
        data = _spawn(method, argv, coarse_samples)
        results["methods"][method] = data
        if "error" in data:
            print(f"=== {method} FAILED: {data['error']}", flush=True)
        else:
            coarse_samples = data["coarse_samples"] if coarse_samples is None else coarse_samples
            stages = data["prune"]["stages"]
            print(
                f"=== {method} done in {data['wall']:.0f} s (prune {data['prune']['seconds']:.1f} s: "
                + ", ".join(f"{stage} {stats['seconds']:.1f} s" for stage, stats in stages.items())
                + f"); sparsity {data['prune']['overall_sparsity']:.4f}, loss {data['dense']['loss']:.4f} -> "
                f"{data['pruned']['loss']:.4f}",
                flush=True,
            )
        if args.json is not None:
            dump_json(args.json, results)
        if args.write is not None:
            section = SECTIONS[SCALES[args.scale].get("language", "opt")]
            write_section(args.write, section, render(args, argv, results, planned))
    section = render(args, argv, results, planned)
    sys.stdout.write(section + "\n")
    sys.stdout.flush()
    if any("error" in data for data in results["methods"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
