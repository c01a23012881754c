"""The score variant registry: how a unit's gradient magnitude and its weights make one importance score.

A variant is a pair of pure functions registered under a name with :func:`register_score`:
``elementwise(weight, grad)`` for the first-order estimator (per element, summed by the caller) and
``from_scalar(s, weights)`` for the zeroth-order and gradient-norm estimators, whose gradient magnitude ``s`` is one
scalar per unit.
``PruningConfig.score`` picks it; only the chosen variant is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ecoflap_pl.pruning.registry import Registry

ElementwiseScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScalarScore = Callable[[float, Sequence[torch.Tensor]], float]


@dataclass(frozen=True)
class ScoreVariant:
    """A registered score variant.

    Attributes:
        name: the ``PruningConfig.score`` value.
        elementwise: ``(weight, grad) -> per-element scores`` (same shape; fp32 or wider inputs).
        from_scalar: ``(s, weights) -> score`` of a unit of ``weights`` whose gradient magnitude estimate is ``s``.
    """

    name: str
    elementwise: ElementwiseScore
    from_scalar: ScalarScore


_SCORES: Registry[ScoreVariant] = Registry("A score variant named", "score", "register it with register_score.")


def register_score(name: str, *, elementwise: ElementwiseScore, from_scalar: ScalarScore) -> ScoreVariant:
    """Register a score variant under ``name`` (``PruningConfig.score``) and return it."""
    return _SCORES.add(name, ScoreVariant(name, elementwise, from_scalar))


def score_names() -> tuple[str, ...]:
    """The registered score variant names, in registration order."""
    return _SCORES.names()


def get_score(name: str) -> ScoreVariant:
    """The variant registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return _SCORES.lookup(name)


def _weight_power_sum(weights: Sequence[torch.Tensor], power: int) -> float:
    """``Σ |w|^power`` over ``weights``, in fp32."""
    return float(sum(weight.detach().float().abs().pow(power).sum() for weight in weights))


register_score("grad_only", elementwise=lambda weight, grad: grad.abs(), from_scalar=lambda s, weights: s)
register_score(
    "grad_mag_abs",
    elementwise=lambda weight, grad: weight.abs() * grad.abs(),
    from_scalar=lambda s, weights: s * _weight_power_sum(weights, 1),
)
register_score(
    "grad_mag_square",
    elementwise=lambda weight, grad: weight.square() * grad.square(),
    from_scalar=lambda s, weights: s * s * _weight_power_sum(weights, 2),
)
