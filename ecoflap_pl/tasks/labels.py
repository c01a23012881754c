"""Token labels of the language-model losses: the ignored label value, prompt masking and the prefix-LM split."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

IGNORE_INDEX = -100
"""Label value the Hugging Face losses skip."""


def prefix_split(text: str, seed: int = 0) -> tuple[str, str]:
    """Split ``text`` for the prefix-LM loss at a character position drawn from ``[1, max(1, len(text) // 2)]``.

    The position comes from a generator seeded by a stable hash of ``seed`` and the text, so the same caption is
    always split the same way (calibration is reproducible) while different captions get different splits.

    Returns:
        ``(prefix, rest)`` with ``prefix + rest == text``.
    """
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    cut = random.Random(int.from_bytes(digest[:8], "big")).randint(1, max(1, len(text) // 2))
    return text[:cut], text[cut:]


def shared_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Number of leading ids two sequences have in common."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length
