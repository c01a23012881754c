"""All-or-nothing pruning: the model's weights and flags are restored on any exception."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WeightTransaction:
    """Remembers the original value of every tensor before its first in-place change.

    Copies are kept on the CPU so that pruning a GPU model does not double its GPU memory.
    """

    def __init__(self) -> None:
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, tensor: torch.Tensor) -> None:
        """Record ``tensor``'s current value unless it is already recorded."""
        if id(tensor) not in self._originals:
            self._originals[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    def rollback(self) -> None:
        with torch.no_grad():
            for tensor, original in self._originals.values():
                tensor.copy_(original.to(tensor.device))
        self._originals.clear()


def _cache_configs(model: nn.Module) -> list[object]:
    configs: list[object] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True and all(config is not seen for seen in configs):
            configs.append(config)
    return configs


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted(
        {
            torch.cuda.current_device() if param.device.index is None else param.device.index
            for param in model.parameters()
            if param.device.type == "cuda"
        }
    )


@contextmanager
def pruning_session(model: nn.Module) -> Iterator[WeightTransaction]:
    """Evaluation mode and no KV caches while pruning; on any exception every recorded weight is rolled back.

    Dropout would add noise to every loss difference and a KV cache would be extended by each replayed block, so
    both are switched off; the training flags and ``config.use_cache`` of Hugging Face modules are restored on
    exit, whatever happens. So is torch's global random state (CPU and the model's CUDA devices): a forward that
    draws from it even in evaluation mode (ViLT samples image patches) would otherwise make a seeded run's later
    randomness depend on how many calibration forwards pruning ran.
    """
    training = {module: module.training for module in model.modules()}
    cache_configs = _cache_configs(model)
    transaction = WeightTransaction()
    model.eval()
    for config in cache_configs:
        config.use_cache = False  # type: ignore[attr-defined]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield transaction
    except BaseException:
        transaction.rollback()
        logger.info("Pruning stopped by an exception; every weight was restored.")
        raise
    finally:
        for module, flag in training.items():
            module.training = flag
        for config in cache_configs:
            config.use_cache = True  # type: ignore[attr-defined]
