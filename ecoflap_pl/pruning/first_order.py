"""First-order importance by back-propagation, streamed so no full gradient outlives its batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.block_outputs import map_tensors, tensor_leaves
from ecoflap_pl.pruning.loss import LossFn, checked_loss
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.score_variants import get_score


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in at least fp32 (fp16/bf16 are widened, fp64 is kept)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _autograd_batch(batch: Any) -> Any:
    """``batch`` with its tensors made under ``torch.inference_mode()`` cloned, one batch at a time: autograd cannot
    save those for backward (a convolution's input), so a batch built in inference mode could not be back-propagated."""
    if not any(tensor.is_inference() for tensor in tensor_leaves(batch)):
        return batch
    return map_tensors(batch, lambda tensor: tensor.clone() if tensor.is_inference() else tensor)


def first_order_sums(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    score: str,
    monitor: StageMonitor,
    on_batch_done: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Per tensor, ``Σ_b Σ_i r(w_i, g_{b,i})`` with ``r`` the ``elementwise`` function of the score variant
    (``ecoflap_pl/pruning/score_variants.py``): ``|g|`` (grad_only), ``|w|·|g|`` (grad_mag_abs) or ``w²·g²``
    (grad_mag_square).

    Divided by the number of batches this is ``Σ_i |w_i| · mean_b |g_{b,i}|`` and its variants: linear in the
    batches, so each parameter's gradient is reduced to one scalar by a post-accumulate hook the moment backward
    produces it, and freed at once. Only the candidate weights require gradients during the pass; every other
    parameter's ``requires_grad`` and ``.grad`` are restored afterwards.
    """
    elementwise = get_score(score).elementwise
    sums = {name: torch.zeros((), dtype=torch.float64, device=param.device) for name, param in params.items()}
    previous = {param: (param.requires_grad, param.grad) for param in model.parameters()}
    handles = []

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                sums[name] += elementwise(_wide(param.detach()), _wide(param.grad)).sum().double()
                param.grad = None

        return hook

    try:
        for param in previous:
            param.requires_grad_(False)
            param.grad = None
        for name, param in params.items():
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(hook_for(name)))
        with torch.enable_grad():
            for batch_id, batch in batches:
                loss = checked_loss(loss_fn, model, _autograd_batch(batch), batch_id)
                if not loss.requires_grad:
                    raise ValueError(
                        f"importance='first_order' back-propagates the calibration loss, but the loss of calibration "
                        f"batch {batch_id} does not require grad (computed under torch.no_grad() or inference mode, "
                        "or detached). HINT: return the loss of the model's forward pass as it is, or use "
                        "importance='zeroth_order' (forward passes only)."
                    )
                loss.backward()
                monitor.full_forwards += 1
                monitor.backward_passes += 1
                if on_batch_done is not None:
                    on_batch_done()
    finally:
        for handle in handles:
            handle.remove()
        for param, (flag, grad) in previous.items():
            param.requires_grad_(flag)
            param.grad = grad
    return {name: float(total) for name, total in sums.items()}
