"""The peer: llm-compressor's Wanda and SparseGPT (plain and with its OWL profile) on the same Gemma-3-270M.

Runs inside ``.venv-llmcompressor`` (made by ``setup_llmcompressor.sh``; llm-compressor pins its own torch and
transformers) and imports nothing from ecoflap-pl. ``benchmarks/gemma_lm.py`` calls it once per seed with that seed's
calibration documents and reads the JSON lines it prints. Calibration and evaluation follow ecoflap-pl's
``LanguageModelingTask`` exactly so that the numbers compare one to one: documents are tokenised with the model's
tokenizer, truncated to ``--max-length`` and padded to the longest of the batch; perplexity is
``exp(sum of next-token NLL / count)`` over every non-padding target token of the evaluation split. The dense model's
perplexity is printed first, as a check that both sides evaluate the same way.

Usage (normally through gemma_lm.py)::

    .venv-llmcompressor/bin/python benchmarks/peer/llmcompressor_gemma.py --model DIR --calibration C.jsonl \
        --evaluation E.jsonl --sparsities 0.5 0.6 0.7
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from unittest import mock

import torch
from llmcompressor import oneshot
from llmcompressor.core import LifecycleCallbacks
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from loguru import logger as peer_logger
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("llmcompressor_gemma")
IGNORE_INDEX = -100
CONFIGS = {
    "wanda": (WandaPruningModifier, False),
    "sparsegpt": (SparseGPTModifier, False),
    "owl_wanda": (WandaPruningModifier, True),
    "owl_sparsegpt": (SparseGPTModifier, True),
}


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token batches as ecoflap-pl's TextCollator builds them (causal model): labels are the ids, padding at -100."""
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            max_length=max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


@torch.no_grad()
def perplexity(model, eval_batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for batch in eval_batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / count)


def decoder_sparsity(model) -> float:
    """Fraction of zeros over the Linear weights of the decoder layers (what both tools prune)."""
    zeros, numel = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            numel += module.weight.numel()
    return zeros / numel


def owl_sparsities(cls, model, loader: DataLoader, sparsity: float, args: argparse.Namespace) -> list[float]:
    """Per-decoder-layer sparsities of llm-compressor's own OWL profile (``_infer_owl_layer_sparsity``).

    In llmcompressor 0.14.0.1, ``sparsity_profile="owl"`` fails inside ``oneshot`` ("Cannot invoke event before
    initializing": its dense activation pass fires session events before the session is initialised), and the dict it
    would produce is not read per layer. So its own method runs here, before ``oneshot``, with those session events
    muted, and the sparsities go to the modifier as the per-layer list it accepts.
    """
    profile = cls(sparsity=sparsity, sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lambda)
    layers = {name: module for name, module in model.named_modules() if type(module).__name__ == args.layer_class}
    with (
        mock.patch.object(LifecycleCallbacks, "calibration_start"),
        mock.patch.object(LifecycleCallbacks, "sequential_epoch_end"),
        mock.patch.object(LifecycleCallbacks, "calibration_end"),
    ):
        by_layer = profile._infer_owl_layer_sparsity(model, layers, loader)
    return [float(by_layer[name]) for name in layers]


def modifier(name: str, sparsity: float, model, loader: DataLoader, args: argparse.Namespace):
    cls, owl = CONFIGS[name]
    # Decoder layers are the targets (OWL gives each one its sparsity); embeddings and lm_head are not pruned.
    layer_sparsity = owl_sparsities(cls, model, loader, sparsity, args) if owl else sparsity
    return cls(sparsity=layer_sparsity, targets=[args.layer_class], ignore=["re:.*lm_head"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="save_pretrained directory of the model and tokenizer")
    parser.add_argument("--calibration", required=True, help="JSON lines with 'text': the calibration documents")
    parser.add_argument("--evaluation", required=True, help="JSON lines with 'text': the evaluation documents")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--owl-m", type=int, default=5)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--layer-class", default="Gemma3DecoderLayer")
    parser.add_argument("--skip-dense", action="store_true", help="do not print the dense perplexity first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    peer_logger.remove()  # llm-compressor logs every layer at INFO; keep its warnings only
    peer_logger.add(sys.stderr, level="WARNING")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = batches(tokenizer, read_texts(args.calibration), args.max_length, args.batch_size)
    evaluation = batches(tokenizer, read_texts(args.evaluation), args.max_length, args.batch_size)
    samples = sum(int(batch["input_ids"].shape[0]) for batch in calibration)

    def load():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    if not args.skip_dense:
        print(
            json.dumps({"config": "dense", "sparsity": 0.0, "perplexity": perplexity(load(), evaluation)}), flush=True
        )
    for name in args.configs:
        for sparsity in args.sparsities:
            model = load()
            loader = DataLoader(calibration, batch_size=None)
            started = time.perf_counter()
            recipe = [modifier(name, sparsity, model, loader, args)]
            oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=samples)
            seconds = time.perf_counter() - started
            record: dict[str, float | str] = {
                "config": name,
                "sparsity": sparsity,
                "perplexity": perplexity(model, evaluation),
                "achieved_sparsity": decoder_sparsity(model),
                "prune_seconds": seconds,
            }
            print(json.dumps(record), flush=True)
            logger.info("%s", record)


if __name__ == "__main__":
    main()
