"""Peak resident memory of pruning a model dispatched with disk offload, against the same model in memory.

``python benchmarks/offload_memory.py build DIR`` saves a LLaMA-shaped model (126 MB in fp32) to DIR;
``python benchmarks/offload_memory.py prune DIR OFFLOAD`` loads it with every decoder layer offloaded to disk, prunes
it (50% Wanda, uniform; ``--importance zeroth_order``: ECoFLaP's zeroth-order coarse step first, with prefix reuse and
batched probes) and prints a JSON line with the model's size and the process's peak resident memory during pruning
above its resident memory before pruning; ``prune DIR`` (no OFFLOAD) does the same with the model in memory.
Run each step in a fresh process (the model is then never in the offloaded run's memory as a whole), with
``MALLOC_MMAP_THRESHOLD_=65536`` (see the README). ``tests/models/test_placement.py`` runs it.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.models.placement import OffloadedWeights
from ecoflap_pl.pruning.monitor import StageMonitor, resident_bytes

LAYERS = 8


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )


def build(folder: str) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(folder)


def prune_model(folder: str, offload: str | None, importance: str) -> None:
    if offload is None:
        model = LlamaForCausalLM.from_pretrained(folder).eval()
    else:
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "disk" for i in range(LAYERS)})
        model = LlamaForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=offload).eval()
    size = sum(param.numel() * param.element_size() for param in model.parameters())
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(8, 128, (2, 16), generator=generator)} for _ in range(2)]

    def loss_fn(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    config = PruningConfig(
        sparsity=0.5, importance=importance, coarse_samples=2, fine_samples=4, max_probe_replicas=4, eps=1e-2
    )
    before = resident_bytes()
    with StageMonitor(torch.device("cpu")) as monitor, OffloadedWeights(model) as weights:
        result = prune(model, batches, loss_fn, config, residency=weights if weights.modules else None)
    peak = monitor.stats.peak_memory_bytes
    print(
        json.dumps(
            {
                "offloaded": offload is not None,
                "model_bytes": size,
                "rss_before": before,
                "peak_increase": peak - before,
                "sparsity": result.overall_sparsity,
                "importance": importance,
                "probe_replicas": result.stages["coarse"].probe_replicas if "coarse" in result.stages else None,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "prune"))
    parser.add_argument("folder")
    parser.add_argument("offload", nargs="?", help="offload folder (prune with the decoder layers on disk)")
    parser.add_argument("--importance", default="uniform", choices=("uniform", "zeroth_order"))
    args = parser.parse_args()
    if args.step == "build":
        build(args.folder)
    else:
        prune_model(args.folder, args.offload, args.importance)
