"""All-or-nothing pruning: the model's weights and flags are restored on any exception."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

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


def _eager(model: nn.Module) -> AbstractContextManager[object]:
    """``torch.compiler.set_stance("force_eager")`` when ``model`` or one of its modules is compiled
    (``torch.compile(module)`` or ``module.compile()``), else nothing.

    Pruning answers block calls from records, hooks every block and intercepts ``F.linear``: under ``torch.compile``
    each of these recompiles or breaks the graph (a compiled LLaMA failed in the zeroth-order step after a minute of
    compiling), while the same forward run eagerly computes the same loss. Compiling imports ``torch._dynamo``, so a
    process without it holds no compiled module (and does not pay for its import here).
    """
    if "torch._dynamo" not in sys.modules:
        return nullcontext()
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = any(
        isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None
        for module in model.modules()
    )
    return torch.compiler.set_stance("force_eager") if compiled else nullcontext()


@contextmanager
def pruning_session(model: nn.Module) -> Iterator[WeightTransaction]:
    """Evaluation mode and no KV caches while pruning; on any exception every recorded weight is rolled back.

    Dropout would add noise to every loss difference and a KV cache would be extended by each replayed block, so
    both are switched off; the training flags and ``config.use_cache`` of Hugging Face modules are restored on
    exit, whatever happens. So is torch's global random state (CPU and the model's CUDA devices): a forward that
    draws from it even in evaluation mode (ViLT samples image patches) would otherwise make a seeded run's later
    randomness depend on how many calibration forwards pruning ran.

    A caller inside ``torch.inference_mode()`` is taken out of it for the session (its grad mode kept): tensors made
    in inference mode keep no version counter (the zeroth-order step reads the recorded outputs' versions) and
    cannot be saved for backward, so the first-order step could not back-propagate, and masks made so would break
    the fine-tuning that multiplies its weights by them. A compiled model runs eagerly for the session (see
    :func:`_eager`); its compiled code serves it again afterwards, with the pruned weights.
    """
    training = {module: module.training for module in model.modules()}
    cache_configs = _cache_configs(model)
    transaction = WeightTransaction()
    model.eval()
    for config in cache_configs:
        config.use_cache = False  # type: ignore[attr-defined]
    grad_enabled = torch.is_grad_enabled()
    try:
        with (
            torch.inference_mode(False),
            torch.set_grad_enabled(grad_enabled),
            torch.random.fork_rng(devices=_cuda_devices(model)),
            _eager(model),
        ):
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
