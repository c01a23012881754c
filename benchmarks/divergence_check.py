"""What the fine-tuning divergence check costs per optimizer step, against the step it guards.

``ECoFLaPPruning`` checks, before every optimizer step of ``fit``, that the gradients are finite (one fused norm over
all of them; the tensors are looked at one by one only when it is not finite). This times that check, the callback's
own function on the model's real gradients, against one training step (forward, loss, backward, AdamW step) of the
same model and batch, median of ``--repeats`` steps after one warm-up step, on random-init models from their configs:
a timm ViT-S/16 on 224 px images and a LLaMA-shaped language model on 128-token sequences.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/divergence_check.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import timm
import torch
from _results import publish_section
from transformers import LlamaConfig, LlamaForCausalLM

from ecoflap_pl.callbacks.pruning import _check_finite_gradients

SECTION = "## Divergence check per fine-tuning step"


def vit_case(batch: int) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    return model, lambda: torch.nn.functional.cross_entropy(model(images), labels)


def llama_case(batch: int) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000
    )
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (batch, 128))
    return model, lambda: model(input_ids=tokens, labels=tokens).loss


def measure(case: Callable[[int], tuple[torch.nn.Module, Callable[[], torch.Tensor]]], batch: int, repeats: int):
    torch.manual_seed(0)
    model, loss_fn = case(batch)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trainer = SimpleNamespace(world_size=1, global_step=0)  # what the check reads of the Trainer on one process
    steps, checks = [], []
    for step in range(repeats + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        stepped = time.perf_counter()
        _check_finite_gradients(trainer, model)  # type: ignore[arg-type]
        checked = time.perf_counter()
        if step:  # the first step warms up the allocator and AdamW's state
            steps.append(stepped - started)
            checks.append(checked - stepped)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return parameters, statistics.median(steps), statistics.median(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", help="RESULTS.md to update with this run's section")
    args = parser.parse_args()
    rows = []
    for name, case, batch in (("timm ViT-S/16, 224 px", vit_case, 8), ("LLaMA-shaped, 128 tokens", llama_case, 4)):
        parameters, step, check = measure(case, batch, args.repeats)
        rows.append((name, batch, parameters, step, check))
        print(f"{name}, batch {batch}: step {step:.3f} s, check {1000 * check:.1f} ms ({100 * check / step:.2f}%)")
    lines = [
        SECTION,
        "",
        f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/divergence_check.py` (random-init models, fp32, "
        f"median of {args.repeats} steps after one warm-up). Machine: {platform.machine()} CPU, "
        f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after the run "
        f"(shared with other jobs); torch {torch.__version__}.",
        "",
        "| model | batch | parameters | training step | divergence check | check / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, batch, parameters, step, check in rows:
        lines.append(
            f"| {name} | {batch} | {parameters / 1e6:.1f} M | {step:.3f} s | {1000 * check:.1f} ms | "
            f"{100 * check / step:.2f}% |"
        )
    lines += [
        "",
        "The check reads every gradient once (one fused norm) and compares one number; the step reads and writes every "
        "weight several times besides the forward and backward work. The worst case here is the language model's "
        "short batch (512 tokens), where the step's compute per weight is smallest. Not measured here (no GPU was "
        "lent): on a GPU, reading the norm also waits for the step's kernels once per step, and with several "
        "processes one boolean all-reduce per step is added.",
    ]
    publish_section("\n".join(lines) + "\n", SECTION, args.write)


if __name__ == "__main__":
    main()
