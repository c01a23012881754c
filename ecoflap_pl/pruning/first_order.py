"""Importance by back-propagation, streamed so no full gradient outlives its batch: the first-order sums and the
exact gradient norms that the zeroth-order estimator estimates."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ecoflap_pl.pruning.block_outputs import CallKey, answered_calls, map_tensors, stack_blocks, tensor_leaves
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


def _kept_activations(model: nn.Module, storage: str, monitor: StageMonitor) -> AbstractContextManager[Any]:
    """What the forward keeps for backward: everything autograd saves, or with ``activation_storage: recompute`` only
    each block call's inputs (activation checkpointing of every block of every discovered stack; each block run again
    during backward is counted in ``monitor.block_forwards``)."""
    if storage != "recompute":
        return nullcontext()

    def checkpointed(_: CallKey, run: Callable[[], Any]) -> Any:
        runs = 0

        def counted() -> Any:
            nonlocal runs
            if runs:  # the second run is backward's
                monitor.block_forwards += 1
            runs += 1
            return run()

        # torch's non-reentrant checkpoint keeps what ``run`` closes over (the block's inputs) and nothing the block
        # saves for backward, and runs the block again when backward reaches it. Hugging Face's own gradient
        # checkpointing cannot serve here: it acts only in train mode, and pruning runs the model in eval mode.
        return checkpoint(counted, use_reentrant=False)

    return answered_calls(stack_blocks(model), checkpointed)


def _streamed_backward(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    importance: str,
    storage: str,
    on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None],
    after_batch: Callable[[], None] | None,
    monitor: StageMonitor,
) -> None:
    """Back-propagate every batch's loss with only ``params`` requiring gradients, handing each gradient to
    ``on_gradient(name, weight, grad)`` (the weight detached, both in the parameter's dtype) the moment backward
    produces it and freeing it at once, so no full gradient outlives its batch; ``after_batch()``, if given, runs once
    each batch's backward is done. ``storage`` is ``activation_storage``: ``"recompute"`` keeps only each block's
    inputs between the forward and the backward pass and runs every block again during backward (one more forward
    of the blocks per batch, the same gradients); any other value keeps what autograd saves, on the device.

    Every parameter's ``requires_grad`` and ``.grad`` are restored afterwards. ``importance`` names the estimator in
    the error raised for a loss that cannot be back-propagated.
    """
    previous = {param: (param.requires_grad, param.grad) for param in model.parameters()}
    handles = []

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                on_gradient(name, param.detach(), param.grad)
                param.grad = None

        return hook

    try:
        for param in previous:
            param.requires_grad_(False)
            param.grad = None
        for name, param in params.items():
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(hook_for(name)))
        with torch.enable_grad(), _kept_activations(model, storage, monitor):
            for batch_id, batch in batches:
                loss = checked_loss(loss_fn, model, _autograd_batch(batch), batch_id)
                if not loss.requires_grad:
                    raise ValueError(
                        f"importance={importance!r} back-propagates the calibration loss, but the loss of calibration "
                        f"batch {batch_id} does not require grad (computed under torch.no_grad() or inference mode, "
                        "or detached). HINT: return the loss of the model's forward pass as it is, or use "
                        "importance='zeroth_order' (forward passes only)."
                    )
                loss.backward()
                monitor.full_forwards += 1
                monitor.backward_passes += 1
                if after_batch is not None:
                    after_batch()
    finally:
        for handle in handles:
            handle.remove()
        for param, (flag, grad) in previous.items():
            param.requires_grad_(flag)
            param.grad = grad


def first_order_sums(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    score: str,
    monitor: StageMonitor,
    storage: str = "auto",
    on_batch_done: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Per tensor, ``Σ_b Σ_i r(w_i, g_{b,i})`` with ``r`` the ``elementwise`` function of the score variant
    (``ecoflap_pl/pruning/score_variants.py``): ``|g|`` (grad_only), ``|w|·|g|`` (grad_mag_abs) or ``w²·g²``
    (grad_mag_square).

    Divided by the number of batches this is ``Σ_i |w_i| · mean_b |g_{b,i}|`` and its variants: linear in the
    batches, so each gradient is reduced to one scalar as backward produces it (:func:`_streamed_backward`).
    """
    elementwise = get_score(score).elementwise
    sums = {name: torch.zeros((), dtype=torch.float64, device=param.device) for name, param in params.items()}

    def add(name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        sums[name] += elementwise(_wide(weight), _wide(grad)).sum().double()

    _streamed_backward(
        model,
        params,
        batches,
        loss_fn,
        importance="first_order",
        storage=storage,
        on_gradient=add,
        after_batch=on_batch_done,
        monitor=monitor,
    )
    return {name: float(total) for name, total in sums.items()}


EXPECTED_ABS_NORMAL = math.sqrt(2.0 / math.pi)
"""``E|N(0, 1)|``: a Gaussian direction ``z`` gives ``E|zᵀg| = ‖g‖₂ · sqrt(2/π)``."""


def gradient_norm_sums(
    model: nn.Module,
    units: Mapping[str, Sequence[str]],
    params: Mapping[str, nn.Parameter],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    monitor: StageMonitor,
    storage: str = "auto",
    on_batch_done: Callable[[], None] | None = None,
) -> dict[str, float]:
    """``s_u = Σ_b sqrt(2/π) · ‖∇_u L_b‖₂`` for every unit ``u`` (a list of parameter names), by back-propagation.

    This is exactly the expectation of the zeroth-order sums (``zeroth_order.py``) over their Gaussian directions:
    one probe of unit ``u`` on batch ``b`` gives ``|ĝ| = |zᵀ∇_u L_b|`` (up to the ``O(ε²)`` of the finite
    difference), whose mean is ``sqrt(2/π) · ‖∇_u L_b‖₂``; a unit of several tensors (``per_block``) has one
    direction for all of them, so its norm is that of the concatenated gradient. Per batch only one squared norm per
    tensor is kept (computed in at least fp32, kept in fp64); the norm is not linear in the batches, so it is taken
    before the batches are summed.
    """
    squares: dict[str, torch.Tensor] = {}
    sums = {unit: 0.0 for unit in units}

    def add(name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        squares[name] = torch.linalg.vector_norm(_wide(grad)).double().square()

    def end_batch() -> None:
        for unit, names in units.items():
            sums[unit] += EXPECTED_ABS_NORMAL * math.sqrt(float(sum(squares[n] for n in names if n in squares)))
        squares.clear()
        if on_batch_done is not None:
            on_batch_done()

    _streamed_backward(
        model,
        params,
        batches,
        loss_fn,
        importance="gradient_norm",
        storage=storage,
        on_gradient=add,
        after_batch=end_batch,
        monitor=monitor,
    )
    return sums
