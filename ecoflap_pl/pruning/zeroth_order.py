"""Zeroth-order (forward-only) importance: two-point gradient estimates along random directions (MeZO-style)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ecoflap_pl.pruning.loss import LossFn, checked_loss
from ecoflap_pl.pruning.monitor import StageMonitor
from ecoflap_pl.pruning.residency import Residency, resident

logger = logging.getLogger(__name__)
_MIX = 1_000_003


def probe_seed(seed: int, unit: int, batch_id: int, probe: int) -> int:
    """A distinct, reproducible generator seed for each (unit, batch, probe); independent of the DDP rank."""
    return (((seed * _MIX + unit) * _MIX + batch_id) * _MIX + probe) % (2**63 - 1)


def probe_directions(tensors: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """One standard normal direction per tensor (its shape, dtype and device) from a generator seeded with ``seed``."""
    generator = torch.Generator(device=tensors[0].device)
    generator.manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype) for t in tensors]


class TwoPointSums:
    """``s_u = Σ_b mean_k |ĝ_{u,b,k}|`` with ``ĝ = (L+ − L−) / (2ε)``, added probe by probe; counts the probes whose two
    losses were equal (flat: the loss could not resolve the perturbation).

    Args:
        units: the unit names, in order.
        eps: perturbation size ε.
        probes: directions per batch (the ``mean_k``).
    """

    def __init__(self, units: Iterable[str], eps: float, probes: int) -> None:
        self.sums = dict.fromkeys(units, 0.0)
        self.flat: dict[str, int] = {}
        self.eps, self.probes = eps, probes

    def add(self, unit: str, plus: float, minus: float) -> None:
        """Add one probe of ``unit`` from its two losses."""
        difference = plus - minus
        if difference == 0.0:
            self.flat[unit] = self.flat.get(unit, 0) + 1
        self.sums[unit] += abs(difference) / (2.0 * self.eps) / self.probes

    def finish(self, batch_count: int) -> dict[str, float]:
        """The sums, after a warning naming the units whose probes saw no change of the loss."""
        if self.flat:
            worst = sorted(self.flat, key=self.flat.__getitem__, reverse=True)[:3]
            logger.warning(
                "Zeroth-order probes of %d of %d units saw no change of the loss (most: %s, of %d probes each); their "
                "scores sit at the loss's precision floor. HINT: raise `eps` (now %g), run the loss in fp32/fp64, or "
                "use importance='gradient_norm' (the same scores, exact, by back-propagation).",
                len(self.flat),
                len(self.sums),
                ", ".join(f"{unit} {self.flat[unit]}" for unit in worst),
                batch_count * self.probes,
                self.eps,
            )
        return self.sums


def non_finite_perturbation(weights: str, eps: float, batch_id: int) -> FloatingPointError:
    """The error for a loss that is finite unperturbed but not with ``weights`` (already formatted) perturbed."""
    return FloatingPointError(
        f"The calibration loss becomes non-finite when the weights of {weights} are perturbed by eps={eps:g} (it is "
        f"finite unperturbed on calibration batch {batch_id}). The model was left unchanged. HINT: lower `eps` (the "
        "official runs use 1e-3)."
    )


def _perturbed_loss(
    loss_fn: LossFn,
    model: nn.Module,
    batch: Any,
    batch_id: int,
    unit: str,
    eps: float,
    tensors: Sequence[torch.Tensor],
    originals: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The loss with ``unit`` perturbed; a non-finite loss is blamed on ``eps`` when the unperturbed loss is finite."""
    try:
        return checked_loss(loss_fn, model, batch, batch_id)
    except FloatingPointError as error:
        for tensor, original in zip(tensors, originals, strict=True):
            tensor.data.copy_(original)
        checked_loss(loss_fn, model, batch, batch_id)  # raises the data/weight error when the model itself fails
        raise non_finite_perturbation(repr(unit), eps, batch_id) from error


@torch.no_grad()
def zeroth_order_sums(
    model: nn.Module,
    units: Mapping[str, Sequence[nn.Parameter | str]],
    batches: Sequence[tuple[int, Any]],
    loss_fn: LossFn,
    *,
    eps: float,
    probes: int,
    seed: int,
    monitor: StageMonitor,
    on_unit_done: Callable[[], None] | None = None,
    residency: Residency | None = None,
) -> dict[str, float]:
    """``s_u = Σ_b mean_k |ĝ_{u,b,k}|`` for every unit (one tensor, or the tensors of one group).

    For each unit, batch and probe: draw ``z ~ N(0, I)`` shaped like the unit's tensors from a local generator,
    evaluate ``L± = loss(θ ± εz)`` without gradients, and take ``ĝ = (L+ − L−) / (2ε)``, a scalar whose
    expected magnitude is ``sqrt(2/π)·‖∇_θ L‖``. The unit's tensors are restored bit-exactly from a copy after
    every probe (perturbing and un-perturbing in low precision would drift); losses are compared in fp32.

    A probe whose two losses are equal carries no information: the loss cannot resolve the perturbation, and the
    estimate sits at the precision floor ``ulp(L) / (2ε)`` (0 or a multiple of it). A warning names such units.

    Args:
        units: unit name -> the parameters perturbed together (or their names, looked up while resident).
        batches: ``(global batch id, batch)`` pairs; the id seeds the directions, so a batch gets the same
            direction whichever rank evaluates it.
        eps: perturbation size ε.
        probes: directions per batch.
        seed: the run's seed.
        monitor: counts the forward passes.
        on_unit_done: called after each unit (progress).
        residency: holds each unit's offloaded weights resident while it is probed (nothing is written back: the
            weights are restored bit-exactly).
    """
    sums = TwoPointSums(units, eps, probes)
    for unit_index, (unit, members) in enumerate(units.items()):
        with resident(residency, [m for m in members if isinstance(m, str)], write_back=False):
            tensors = [model.get_parameter(m) if isinstance(m, str) else m for m in members]
            originals = [tensor.detach().clone() for tensor in tensors]
            try:
                for batch_id, batch in batches:
                    for probe in range(probes):
                        directions = probe_directions(tensors, probe_seed(seed, unit_index, batch_id, probe))
                        for tensor, direction in zip(tensors, directions, strict=True):
                            tensor.data.add_(direction, alpha=eps)
                        plus = _perturbed_loss(loss_fn, model, batch, batch_id, unit, eps, tensors, originals)
                        for tensor, original, direction in zip(tensors, originals, directions, strict=True):
                            tensor.data.copy_(original).sub_(direction, alpha=eps)
                        minus = _perturbed_loss(loss_fn, model, batch, batch_id, unit, eps, tensors, originals)
                        for tensor, original in zip(tensors, originals, strict=True):
                            tensor.data.copy_(original)
                        monitor.full_forwards += 2
                        sums.add(unit, float(plus), float(minus))
            finally:
                for tensor, original in zip(tensors, originals, strict=True):
                    tensor.data.copy_(original)
        if on_unit_done is not None:
            on_unit_done()
    return sums.finish(len(batches))
