"""What pruning costs on a full-size LLaVA-1.5-7B, and on a 70B-class LLaVA whose decoder blocks live off the GPU.

Two benchmarks of one concept, a LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` built at random from a config
(CLIP ViT-L/14-336 vision tower, the two-layer projector, a LLaMA language model; nothing is downloaded):

- ``--scale 7b``: the text config of ``llava-hf/llava-1.5-7b-hf`` (LLaMA-7B, 32 x 4096). The model is built
  directly on the GPU in bf16 and pruned there with each ``--methods`` entry (default ECoFLaP zeroth order + Wanda):
  time and peak GPU memory per stage.
- ``--scale 70b_offload``: the text config of Llama-2-70B (8192 wide, MLP 28672, grouped-query attention with 8
  key/value heads) with the same vision tower, but only ``--layers`` of its 80 decoder blocks (default 4): 80 blocks
  in bf16 are 138 GB of weights, more than this benchmark's machine has in CPU RAM, and the goal is about the peak
  of *one* block, which does not depend on how many blocks follow. The model is dispatched with Accelerate's
  ``dispatch_model`` and a ``device_map`` that puts every decoder block of the language model in CPU memory
  (``--offload cpu``: Accelerate loads each block onto the GPU for its call and drops it after) or on disk
  (``--offload disk``); the rest (vision tower, projector, embeddings, norm, head) stays on the GPU. It is pruned
  with uniform Wanda and ECoFLaP zeroth order + Wanda, both with the calibration activations on the CPU
  (``activation_storage="cpu"``) and one probe per forward, so the device holds one block at a time. The
  reference is the peak of one dense forward + loss of the same dispatched model over one calibration batch: the
  resident weights plus one block's weights plus that forward's activations. Goal: pruning peak ≤ 1.10 x it.
- ``--scale tiny`` / ``tiny_offload``: the same code paths on tiny shapes, for the CPU (``tests/benchmarks`` runs
  them; ``tiny_offload`` needs ``--offload disk`` there, since on a CPU-only machine "cpu" is not offloading).

The calibration data is random and seeded: N(0, 1) images, the image tokens, random caption tokens; the loss is the
captioning loss on the caption tokens. Every method builds a fresh model in the same process (the peaks are the
engine's per-stage records, reset at each stage's start). The JSON (``--json``) and the markdown section
(``--write``) are rewritten after every method, so a run that is killed leaves its finished methods behind.

Usage::

    python benchmarks/llava_size.py --scale 7b --json $OUT/llava_7b.json --write benchmarks/RESULTS.md
    python benchmarks/llava_size.py --scale 70b_offload --json $OUT/llava_70b.json --write benchmarks/RESULTS.md
    python benchmarks/llava_size.py --scale tiny_offload --device cpu --dtype float32 --offload disk
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch
import transformers
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
from accelerate import dispatch_model
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.models.placement import OffloadedWeights
from ecoflap_pl.pruning.monitor import StageMonitor

logger = logging.getLogger("llava_size")
SECTIONS = {
    False: "## Full-size LLaVA-1.5-7B on a GPU",
    True: "## A 70B-class LLaVA larger than the GPU: decoder blocks offloaded",
}
METHODS: dict[str, dict[str, Any]] = {
    "zeroth_order": {"importance": "zeroth_order", "method": "wanda"},
    "first_order": {"importance": "first_order", "method": "wanda"},
    "wanda": {"importance": "uniform", "method": "wanda"},
}
LABELS = {
    "zeroth_order": "ECoFLaP zeroth-order + Wanda",
    "first_order": "ECoFLaP first-order + Wanda",
    "wanda": "Wanda (uniform)",
}
LANGUAGE_BLOCKS = "model.language_model.layers"
FIRST_WORD_ID = 8  # random caption tokens are drawn above the special ids

# openai/clip-vit-large-patch14-336, as llava-hf/llava-1.5-7b-hf configures it.
CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
LLAMA_7B = {
    "model_type": "llama",
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
LLAMA_2_70B = {
    **LLAMA_7B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
TINY_VISION = {**CLIP_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY_VISION.update({"num_attention_heads": 4, "image_size": 28, "patch_size": 14, "projection_dim": 32})
TINY_TEXT = {**LLAMA_7B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_TEXT.update({"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128})

SCALES: dict[str, dict[str, Any]] = {
    "7b": {
        "vision": CLIP_L_336,
        "text": LLAMA_7B,
        "image_token_id": 32000,
        "offloaded": False,
        # Sized for a short GPU lease (~1 min on an H100); the official recipes calibrate on more samples.
        "defaults": {"batch_size": 4, "text_tokens": 32, "coarse_samples": 4, "fine_samples": 32},
        "pruning": {},
    },
    "70b_offload": {
        "vision": CLIP_L_336,
        "text": LLAMA_2_70B,
        "image_token_id": 32000,
        "offloaded": True,
        "defaults": {"batch_size": 2, "text_tokens": 32, "coarse_samples": 2, "fine_samples": 8, "layers": 4},
        # One block on the device at a time: activations between blocks on the CPU, one probe per forward, and one
        # probe per block (per-tensor probes would load every offloaded block ~400 times over PCIe).
        "pruning": {"activation_storage": "cpu", "max_probe_replicas": 1, "probe_granularity": "per_block"},
    },
    "tiny": {
        "vision": TINY_VISION,
        "text": TINY_TEXT,
        "image_token_id": 4,
        "offloaded": False,
        "defaults": {"batch_size": 2, "text_tokens": 8, "coarse_samples": 2, "fine_samples": 4},
        "pruning": {"eps": 1e-2},
    },
}
SCALES["tiny_offload"] = {
    **SCALES["tiny"],
    "offloaded": True,
    "defaults": {**SCALES["tiny"]["defaults"], "layers": 2},
    "pruning": {**SCALES["70b_offload"]["pruning"], "eps": 1e-2},
}


def llava_config(args: argparse.Namespace) -> LlavaConfig:
    """The LLaVA-1.5 config of ``args.scale`` (with ``--layers`` decoder blocks where given)."""
    spec = SCALES[args.scale]
    text = dict(spec["text"])
    if args.layers is not None:
        text["num_hidden_layers"] = args.layers
    return LlavaConfig(
        vision_config=spec["vision"],
        text_config=text,
        image_token_id=spec["image_token_id"],
        vision_feature_layer=-2,  # LLaVA-1.5 reads the penultimate CLIP layer
        vision_feature_select_strategy="default",  # and drops its CLS token
        projector_hidden_act="gelu",
    )


def image_tokens(config: LlavaConfig) -> int:
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def build_model(config: LlavaConfig, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """The seeded random model, created directly on ``device`` in ``dtype``, in eval mode."""
    return seeded_random_model(LlavaForConditionalGeneration, config, device, dtype).eval()


def offload_device_map(model: torch.nn.Module, target: str, main: str | int) -> dict[str, str | int]:
    """Every block of the language model on ``target`` ("cpu" or "disk"), every other module on ``main``."""
    device_map: dict[str, str | int] = {}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == LANGUAGE_BLOCKS:
                device_map.update({f"{full}.{index}": target for index in range(len(child))})
            elif LANGUAGE_BLOCKS.startswith(full + "."):
                walk(child, full + ".")
            else:
                device_map[full] = main

    walk(model, "")
    return device_map


def offloaded_blocks(modules: list[str]) -> list[str]:
    """The language-model blocks that hold ``modules`` (the modules whose weights Accelerate offloaded)."""
    depth = LANGUAGE_BLOCKS.count(".") + 2
    return sorted({".".join(name.split(".")[:depth]) for name in modules}, key=lambda name: int(name.split(".")[-1]))


def make_batches(
    args: argparse.Namespace, config: LlavaConfig, samples: int, device: torch.device, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """Seeded calibration batches: the image tokens, then caption tokens; loss on the caption tokens only."""
    generator = torch.Generator().manual_seed(1)
    images, size = image_tokens(config), config.vision_config.image_size
    vocab, image_id = config.text_config.vocab_size, config.image_token_id
    batches = []
    for start in range(0, samples, args.batch_size):
        count = min(args.batch_size, samples - start)
        input_ids = torch.randint(FIRST_WORD_ID, vocab, (count, images + args.text_tokens), generator=generator)
        input_ids[input_ids == image_id] = FIRST_WORD_ID
        input_ids[:, :images] = image_id
        labels = input_ids.clone()
        labels[:, :images] = -100
        pixel_values = torch.randn(count, 3, size, size, generator=generator)
        batches.append(
            {
                "pixel_values": pixel_values.to(device=device, dtype=dtype),
                "input_ids": input_ids.to(device),
                "labels": labels.to(device),
            }
        )
    return batches


def captioning_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def place(
    model: LlavaForConditionalGeneration, args: argparse.Namespace, device: torch.device, folder: str
) -> dict[str, Any]:
    """Dispatch ``model`` (built on ``device``) with its language blocks offloaded; what was placed where."""
    block_bytes = _bytes(model.get_submodule(f"{LANGUAGE_BLOCKS}.0"))
    offloaded_bytes = _bytes(model.get_submodule(LANGUAGE_BLOCKS))
    model.to("cpu")  # the blocks' home; built on the device only because random init is fast there
    main: str | int = (device.index or 0) if device.type == "cuda" else "cpu"
    device_map = offload_device_map(model, args.offload, main)
    dispatch_model(model, device_map=device_map, main_device=main, offload_dir=folder)
    return {
        "device_map": {name: str(where) for name, where in device_map.items()},
        "offload": args.offload,
        "block_weight_bytes": block_bytes,
        "offloaded_weight_bytes": offloaded_bytes,
    }


def run_method(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Build (and dispatch) a fresh model, measure one dense forward, prune with ``method``."""
    spec = SCALES[args.scale]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = llava_config(args)
    out: dict[str, Any] = {"method": method}
    with tempfile.TemporaryDirectory() as folder:
        with StageMonitor(device) as monitor:
            model = build_model(config, device, dtype)
            if spec["offloaded"]:
                out["placement"] = place(model, args, device, folder)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        parameters = sum(p.numel() for p in model.parameters())
        weights = _bytes(model) if not spec["offloaded"] else None
        out["model"] = {"parameters": parameters, "weight_bytes": weights, "build": monitor.stats.to_dict()}
        samples = max(args.coarse_samples, args.fine_samples)
        batches = make_batches(args, config, samples, device, dtype)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        with torch.no_grad():
            captioning_loss(model, batches[0])  # warm-up
            with StageMonitor(device) as monitor:
                dense_loss = float(captioning_loss(model, batches[0]))
        out["dense"] = {"loss": dense_loss, "forward": monitor.stats.to_dict(), "resident_bytes": resident}
        logger.info(
            "[%s] %s parameters built in %.1f s; one dense forward %.2f s, peak %.2f GiB",
            method,
            format_count(parameters),
            out["model"]["build"]["seconds"],
            monitor.stats.seconds,
            monitor.stats.peak_memory_bytes / GIB,
        )
        pruning = PruningConfig(
            sparsity=args.sparsity,
            coarse_samples=args.coarse_samples,
            fine_samples=args.fine_samples,
            seed=0,
            **{**METHODS[method], **spec["pruning"]},
        )
        started = time.perf_counter()
        if spec["offloaded"]:
            with OffloadedWeights(model) as residency:
                out["placement"]["offloaded_blocks"] = offloaded_blocks(residency.modules)
                result = prune(
                    model, batches, captioning_loss, pruning, progress=progress_printer(started), residency=residency
                )
        else:
            result = prune(model, batches, captioning_loss, pruning, progress=progress_printer(started))
        with torch.no_grad():
            pruned_loss = float(captioning_loss(model, batches[0]))
        out["prune"] = {
            "config": pruning.to_dict(),
            "seconds": time.perf_counter() - started,
            "stages": {stage: stats.to_dict() for stage, stats in result.stages.items()},
            "overall_sparsity": result.overall_sparsity,
            "tower_sparsity": result.tower_sparsity(),
        }
        out["pruned"] = {"loss": pruned_loss}
        del model, batches, result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _peak(data: dict[str, Any]) -> int:
    return max(stats["peak_memory_bytes"] for stats in data["prune"]["stages"].values())


def _row(method: str, data: dict[str, Any], offloaded: bool) -> str:
    if "error" in data:
        return f"| {LABELS[method]} | failed: {data['error']} |"
    stages = data["prune"]["stages"]
    coarse = f"{stages['coarse']['seconds']:.1f}" if "coarse" in stages else "–"
    cells = [
        LABELS[method],
        coarse,
        f"{stages['fine']['seconds']:.1f}",
        f"{data['prune']['seconds']:.1f}",
        f"{_peak(data) / GIB:.2f}",
    ]
    if offloaded:
        reference = data["dense"]["forward"]["peak_memory_bytes"]
        cells.append(f"{_peak(data) / reference:.3f}")
    cells += [f"{data['prune']['overall_sparsity']:.4f}", f"{data['dense']['loss']:.4f} → {data['pruned']['loss']:.4f}"]
    return "| " + " | ".join(cells) + " |"


def render(args: argparse.Namespace, argv: list[str], results: dict[str, Any]) -> str:
    spec = SCALES[args.scale]
    offloaded = spec["offloaded"]
    command = " ".join(["python", "benchmarks/llava_size.py", *argv])
    lines = [SECTIONS[offloaded], "", f"Command: `{command}`", ""]
    done = {m: d for m, d in results["methods"].items() if "error" not in d}
    if len(results["methods"]) < len(args.methods):
        lines += [f"**Partial: {len(results['methods'])} of {len(args.methods)} methods done.**", ""]
    if not done:
        return "\n".join([*lines, "No method finished.", ""])
    first = done[next(iter(done))]
    memory = "GPU" if args.device == "cuda" else "RSS"
    text, vision = spec["text"], spec["vision"]
    layers = args.layers if args.layers is not None else text["num_hidden_layers"]
    lines += [
        f"Machine: {results['device']}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.dtype} weights.",
        "",
        f"Model ({args.scale} scale): random-init `LlavaForConditionalGeneration`: CLIP ViT "
        f"{vision['num_hidden_layers']} x {vision['hidden_size']} ({vision['image_size']}px, patch "
        f"{vision['patch_size']}), projector, LLaMA "
        f"{layers} of {text['num_hidden_layers']} x {text['hidden_size']} (MLP {text['intermediate_size']}, "
        f"{text['num_key_value_heads']} key/value heads): {format_count(first['model']['parameters'])} parameters. "
        f"Calibration: batches of {args.batch_size} ({image_tokens(llava_config(args))} image tokens + "
        f"{args.text_tokens} caption tokens), coarse {args.coarse_samples} / fine {args.fine_samples} samples, "
        f"sparsity {args.sparsity:g}.",
        "",
    ]
    if offloaded:
        placement, dense = first["placement"], first["dense"]
        lines += [
            f"Placement: every language-model block on `{placement['offload']}` (Accelerate `dispatch_model`, "
            f"{len(placement['offloaded_blocks'])} blocks, {format_size(placement['offloaded_weight_bytes'])}), "
            f"the rest on the device. One block's weights {format_size(placement['block_weight_bytes'])}; resident on "
            "the device before the forward (weights left there + calibration batches): "
            + (f"{format_size(dense['resident_bytes'])}. " if dense["resident_bytes"] is not None else "n/a. ")
            + f"Reference = peak of one dense forward + loss over one batch of the dispatched model (resident + one "
            f"block + activations): {format_size(dense['forward']['peak_memory_bytes'])}. Goal: prune peak ≤ 1.10 x "
            "reference. Pruning settings for one block at a time on the device: "
            + ", ".join(f"`{key}: {value}`" for key, value in spec["pruning"].items())
            + ".",
            "",
        ]
    header = ["method", "coarse s", "fine s", "prune s", f"peak {memory} GiB"]
    header += ["peak / reference"] if offloaded else []
    header += ["achieved sparsity", "loss dense → pruned"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        _row(method, results["methods"][method], offloaded) for method in args.methods if method in results["methods"]
    ]
    lines += [
        "",
        "Seconds and peaks are the engine's per-stage records (`PruningResult.stages`; GPU: "
        "`torch.cuda.max_memory_allocated`, reset at each stage's start, weights included). Random weights: the "
        "losses only show the pruned model still runs.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="7b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None)
    parser.add_argument("--offload", choices=("cpu", "disk"), default="cpu", help="where offloaded blocks live")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks of the language model")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--coarse-samples", type=int, default=None)
    parser.add_argument("--fine-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on the CPU)")
    parser.add_argument("--write", default=None, help="markdown file whose section is (re)written")
    parser.add_argument("--json", default=None, help="JSON file of every raw number, rewritten after each method")
    args = parser.parse_args(argv)
    spec = SCALES[args.scale]
    for name, value in spec["defaults"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.methods is None:
        args.methods = ["wanda", "zeroth_order"] if spec["offloaded"] else ["zeroth_order"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but torch sees no CUDA device. HINT: on a CPU machine use a tiny --scale with "
            "--device cpu --dtype float32"
        )
    if spec["offloaded"] and args.device == "cpu" and args.offload == "cpu":
        parser.error(
            "--offload cpu on --device cpu is no offloading (the blocks would simply run on the CPU). "
            "HINT: use --offload disk on the CPU"
        )
    check_run_args(parser, args, ("batch_size", "coarse_samples", "fine_samples", "text_tokens"))
    if args.layers is not None and args.layers < 2:
        parser.error(f"--layers must be at least 2 (the engine prunes stacks of 2+ blocks), got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/llava_size.py", *argv]),
        "args": vars(args),
        "device": name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "methods": {},
    }
    section = SECTIONS[SCALES[args.scale]["offloaded"]]
    for method in args.methods:
        try:
            results["methods"][method] = run_method(args, method)
        except torch.cuda.OutOfMemoryError as error:  # a measured outcome, not a crash: record it, try the next
            results["methods"][method] = {"method": method, "error": f"out of GPU memory: {str(error)[:200]}"}
        if args.json is not None:
            dump_json(args.json, results)
        if args.write is not None:
            write_section(args.write, section, render(args, argv, results))
    sys.stdout.write(render(args, argv, results) + "\n")
    if any("error" in data for data in results["methods"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
