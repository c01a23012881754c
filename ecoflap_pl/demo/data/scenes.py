"""The demo's ground truth: scenes of one to three handwritten digits, sampled from disjoint per-split pools.

A scene is what a picture shows (digit values, colours, boxes, grid columns); every image and text of the demo is
generated from it. Digits come from scikit-learn's bundled 8x8 handwritten digits, split per class into disjoint
train, val and test pools so that evaluation always sees handwriting that training never saw.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

#: The digit palette (name -> RGB). Names are the only colour words any text uses.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "green": (50, 205, 70),
    "blue": (70, 110, 255),
    "yellow": (245, 225, 40),
    "white": (240, 240, 240),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Synthetic ImageNet-style wnids, one per digit (sorted order = digit order).
WNIDS = tuple(f"n{d:08d}" for d in range(10))
CLASS_NAMES = tuple(f"digit {word}" for word in NUMBER_WORDS)
#: Every canonical VQA answer the generator can produce (digits as numerals, colours, yes/no).
ANSWER_VOCABULARY = (*(str(d) for d in range(10)), *COLOURS, "yes", "no")

SIDES = ("left", "middle", "right")


@dataclass(frozen=True)
class Digit:
    """One digit of a scene: its value, colour name, box (pixels), grid column (0-2, left to right) and index into
    `load_digits()`."""

    value: int
    colour: str
    x: int
    y: int
    size: int
    sample: int
    column: int


@dataclass(frozen=True)
class Scene:
    """A picture's ground truth: an image id and its digits sorted left to right."""

    image_id: int
    digits: tuple[Digit, ...]

    @property
    def sides(self) -> tuple[str, ...]:
        """Position word of each digit, its grid column ("left", "middle", "right"), aligned with `digits`."""
        return tuple(SIDES[digit.column] for digit in self.digits)


def seeded_rng(seed: int, *stream: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), so changing one part never shifts another."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in stream)])


def split_pools(targets: np.ndarray, seed: int) -> dict[str, list[np.ndarray]]:
    """Disjoint per-class sample pools: 70% train, 15% val, 15% test of each digit's samples."""
    rng = seeded_rng(seed, "pools")
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for value in range(10):
        indices = rng.permutation(np.flatnonzero(targets == value))
        cut_train, cut_val = int(0.7 * len(indices)), int(0.85 * len(indices))
        pools["train"].append(indices[:cut_train])
        pools["val"].append(indices[cut_train:cut_val])
        pools["test"].append(indices[cut_val:])
    return pools


def cell_digit(rng: np.random.Generator, value: int, column: int, pool: list[np.ndarray], image_size: int) -> Digit:
    """A digit of ``value`` centred in a random row of ``column`` of the image's 3x3 grid of cells, filling 3/4, 7/8
    or all of its cell, in a random colour and handwriting from ``pool``."""
    cell = image_size // 3
    size = cell - int(rng.integers(3)) * cell // 8
    x, y = (k * cell + (cell - size) // 2 for k in (column, int(rng.integers(3))))
    return Digit(value, str(rng.choice(list(COLOURS))), x, y, size, int(rng.choice(pool[value])), column)


def sample_scene(rng: np.random.Generator, pool: list[np.ndarray], image_id: int, image_size: int) -> Scene:
    """1-3 distinct digit values in distinct columns of a 3x3 grid of cells, one digit per cell.

    Positions, sizes and colours vary while left/middle/right stay unambiguous, and a ViT whose patches are the
    cells (patch size ``image_size // 3``) sees every digit whole in one patch: small models learn the scenes in
    minutes on a CPU.
    """
    count = int(rng.integers(1, 4))
    values = rng.choice(10, size=count, replace=False)
    columns = np.sort(rng.choice(3, size=count, replace=False))
    digits = tuple(cell_digit(rng, int(v), int(c), pool, image_size) for v, c in zip(values, columns, strict=True))
    return Scene(image_id, digits)
