"""Rounding real-valued per-group keeps to integers that meet an exact total."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping


def round_to_total(
    shares: Mapping[str, float],
    total: int,
    capacity: Mapping[str, int],
    tie_break: Callable[[str], float] = lambda group: 0.0,
) -> dict[str, int]:
    """Integers ``n_g`` with ``Σ n_g = total`` (when the capacities allow) by the largest-remainder method.

    Every group first gets ``floor(shares[g])``; the weights still missing go one each to the groups with the
    largest fractional parts (then the highest ``tie_break(g)``, then the first group), never above ``capacity[g]``.

    Args:
        shares: group -> real-valued share, ``0 <= shares[g] <= capacity[g]``.
        total: the integer sum to meet.
        capacity: group -> the most it may get.
        tie_break: orders groups with equal fractional parts (higher first).
    """
    counts = {group: min(math.floor(share + 1e-9), capacity[group]) for group, share in shares.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(
        (group for group in shares if counts[group] < capacity[group]),
        key=lambda group: (-(shares[group] - counts[group]), -tie_break(group)),
    )
    for group in by_remainder[: max(leftover, 0)]:
        counts[group] += 1
    return counts
