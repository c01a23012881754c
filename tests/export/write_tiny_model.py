"""Child process of the interruption tests: write a tiny pruned LLaMA into ``argv[1]`` with ``save_pruned``.

``argv[2]`` names where the child kills itself (SIGKILL): ``none``, or a step of the write, before or after it runs.
``argv[3]`` is the seed of the weights (a different seed gives a different folder).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from typing import Any

import torch

from ecoflap_pl.callbacks import export as callback_export
from ecoflap_pl.export import atomic, checkpoint
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.pruning import PruningConfig, prune

STEPS = {
    "weights": (checkpoint, "_write_masks"),
    "processors": (checkpoint, "tensor_bytes"),
    "report": (callback_export, "write_report"),
    "card": (callback_export, "write_model_card"),
    "sync": (atomic, "_sync_tree"),
    "swap": (atomic, "_swap_into_place"),
    "exchange": (atomic, "_exchange"),
    "fsync_parent": (atomic, "_fsync_dir"),
}


def kill_around(module: Any, name: str, after: bool) -> None:
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after:
            os.kill(os.getpid(), signal.SIGKILL)
        value = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return value

    setattr(module, name, wrapper)


def main(target: str, kill_at: str, seed: int) -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama", seed=seed)
    batches = [{"input_ids": torch.randint(8, 100, (2, 8), generator=torch.Generator().manual_seed(seed))}]
    config = PruningConfig(sparsity=0.5, coarse_samples=2, fine_samples=2)
    result = prune(model, batches, lambda m, b: m(**b, labels=b["input_ids"]).loss, config)
    # Wall time and memory differ from run to run; zeroed, two writes of one seed are byte-identical.
    result = replace(
        result,
        stages={stage: replace(stats, seconds=0.0, peak_memory_bytes=0) for stage, stats in result.stages.items()},
    )
    if kill_at != "none":
        step, _, when = kill_at.partition(":")
        kill_around(*STEPS[step], after=when == "after")
    print("writing", flush=True)
    callback_export.save_pruned(
        model, target, masks=result.masks, save_format="dense", processors=[], result=result, metadata={}
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
