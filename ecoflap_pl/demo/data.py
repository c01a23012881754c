"""Small multimodal demo datasets built from real handwritten digits, written in the official layouts.

The pictures are *scenes*: one to three of scikit-learn's bundled 8x8 handwritten digits
(`sklearn.datasets.load_digits`, 1797 samples, no download), upscaled to varied sizes, coloured from a small
palette and placed left to right on a dark background. Every text (captions, VQA questions and answers,
NLVR2 statements) is generated from the scene's ground truth, so a model can actually learn it. Digits come from
disjoint sample pools for train, val and test: evaluation always sees handwriting that training never saw.

`build_demo_data(root)` writes, under `root` (exactly the layouts of docs/data_formats.md, so the demo goes through
the same DataModules users run on the real datasets)::

    coco/                                        COCO captions and VQAv2 (shared images, as in the real datasets)
      train2014/COCO_train2014_{id:012d}.jpg     train scenes
      val2014/COCO_val2014_{id:012d}.jpg         val scenes, then test scenes (Karpathy val / test)
      test2015/COCO_test2015_{id:012d}.jpg       further unseen scenes (VQAv2 test, no annotations)
      annotations/captions_{train,val}2014.json  official COCO captions
      annotations/coco_karpathy_{train,val,test}.json   BLIP/LAVIS Karpathy split
      v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
      v2_mscoco_{train2014,val2014}_annotations.json
      answer_list.json                           LAVIS-style candidate answers (digits, colours, yes, no)
    nlvr2/{train,dev,test1}.json                 JSON lines; images train/{directory}/train-{p}-0-img{0,1}.png,
                                                 dev/dev-{p}-0-img{0,1}.png, test1/test1-{p}-0-img{0,1}.png
    imagenet/train/{wnid}/{wnid}_{n}.JPEG        single digits; 10 SYNTHETIC wnids n00000000..n00000009
    imagenet/val/{wnid}/ILSVRC2012_val_{k:08d}.JPEG   (the per-wnid val layout of ImageNet's valprep.sh)
    imagenet/LOC_synset_mapping.txt              "n00000003 digit three" (Kaggle's class-name file)
    imagenet/class_names.json                    {"n00000003": "digit three", ...} (`class_names_file`)
    imagenet_flat/val/ILSVRC2012_val_{k:08d}.JPEG + LOC_val_solution.csv   the flat Kaggle val variant
    imagenet_flat/train -> ../imagenet/train     (symlink), and the same two class-name files
    scenes.json                                  ground truth of every picture (digits, colours, boxes)
    corpus.txt                                   every training text, one per line (to train a tokenizer)
    ecoflap_demo.json                            marker: the parameters this directory was built with

The wnids are synthetic (digit d is `n0000000d`): they are not WordNet ids and collide with no real class.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ecoflap_pl.demo.cache import cached_build, read_marker

__all__ = [
    "ANSWER_VOCABULARY",
    "CLASS_NAMES",
    "COLOURS",
    "DemoPaths",
    "Digit",
    "Scene",
    "WNIDS",
    "build_demo_data",
]

log = logging.getLogger(__name__)

#: Bumped whenever the generated content changes, so that older caches are rebuilt.
DATA_VERSION = 3
MARKER = "ecoflap_demo.json"

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

_SIDES = ("left", "middle", "right")
_LICENSE = {
    "id": 1,
    "name": "UCI ML hand-written digits (CC BY 4.0), bundled with scikit-learn",
    "url": "https://archive.ics.uci.edu/dataset/80",
}
_INFO = {
    "description": "ecoflap-pl demo: synthetic scenes of scikit-learn handwritten digits",
    "version": "1.0",
    "year": 2014,
    "contributor": "ecoflap-pl",
    "date_created": "2014-01-01 00:00:00",
}

Progress = Callable[[str, int, int], None]


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
        return tuple(_SIDES[digit.column] for digit in self.digits)


@dataclass(frozen=True)
class DemoPaths:
    """Where `build_demo_data` put each dataset: `coco` ... `imagenet_flat` are DataModules' `data_dir`.

    Attributes:
        root: The directory passed to `build_demo_data`.
        coco: COCO captions (official and Karpathy annotations, 2014 image folders).
        vqav2: VQAv2 questions/annotations; the same directory as `coco` (they share the images).
        nlvr2: NLVR2 JSON-lines files and image folders.
        imagenet: ImageNet layout with per-wnid train and val folders.
        imagenet_flat: ImageNet layout with a flat val folder and `LOC_val_solution.csv`.
        corpus: A text file with every training text, one per line.
        scenes: A JSON file with the ground truth of every picture.
    """

    root: Path
    coco: Path
    vqav2: Path
    nlvr2: Path
    imagenet: Path
    imagenet_flat: Path
    corpus: Path
    scenes: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        """The paths `build_demo_data(root)` writes."""
        return cls(
            root=root,
            coco=root / "coco",
            vqav2=root / "coco",
            nlvr2=root / "nlvr2",
            imagenet=root / "imagenet",
            imagenet_flat=root / "imagenet_flat",
            corpus=root / "corpus.txt",
            scenes=root / "scenes.json",
        )


def build_demo_data(
    root: str | os.PathLike[str],
    *,
    train_images: int = 2000,
    val_images: int = 300,
    test_images: int = 300,
    imagenet_train_images: int = 2000,
    imagenet_val_images: int = 500,
    questions_per_image: int = 3,
    image_size: int = 48,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DemoPaths:
    """Write the demo datasets under `root` (see the module docstring for the layout), or reuse them.

    The build goes to a temporary sibling directory that is renamed to `root` when complete, so `root` is never
    half-written. A marker file records the parameters: a later call with the same parameters returns at once;
    different parameters rebuild. The same seed gives byte-identical files.

    Args:
        root: Output directory. It must not exist, be empty, or hold an earlier demo build.
        train_images: Train scenes (COCO train2014, VQAv2 train, NLVR2 train pairs = half of them).
        val_images: Val scenes (Karpathy val; VQAv2 val2014 together with the test scenes; NLVR2 dev).
        test_images: Test scenes (Karpathy test in val2014; NLVR2 test1) and as many VQAv2 test2015 scenes.
        imagenet_train_images: Single-digit images in `imagenet/train` (balanced over the 10 classes).
        imagenet_val_images: Single-digit images in `imagenet/val` and `imagenet_flat/val`.
        questions_per_image: VQAv2 questions per scene (each of a different kind).
        image_size: Side of every (square) image in pixels. Digits sit in the cells of a 3x3 grid, one per
            cell: up to three per scene, one per ImageNet-layout image.
        seed: Seeds every random choice (digit pools, scenes, texts, human answers).
        overwrite: Rebuild even when `root` already holds a build with these parameters, and replace a
            non-empty `root` that is not a demo build.
        progress: Optional `progress(stage, done, total)` called after each image is written.

    Returns:
        The dataset directories.

    Raises:
        ValueError: A size is out of range.
        FileExistsError: `root` is a non-empty directory that is not a demo build and `overwrite` is False.
    """
    pairs = "NLVR2 needs at least one image pair per split."
    classes = "every one of the 10 classes needs an image."
    params = {
        "train_images": _check_int("train_images", train_images, 2, hint=pairs),
        "val_images": _check_int("val_images", val_images, 2, hint=pairs),
        "test_images": _check_int("test_images", test_images, 2, hint=pairs),
        "imagenet_train_images": _check_int("imagenet_train_images", imagenet_train_images, 10, hint=classes),
        "imagenet_val_images": _check_int("imagenet_val_images", imagenet_val_images, 10, hint=classes),
        "questions_per_image": _check_int(
            "questions_per_image", questions_per_image, 1, 6, hint="a scene has at least 6 kinds of question."
        ),
        "image_size": _check_int(
            "image_size", image_size, 32, 1024, hint="scenes are a 3x3 grid of digit cells; 48 suits the demo."
        ),
        "seed": _check_int("seed", seed, 0, hint="numpy seeds are non-negative integers."),
    }
    root = Path(root)
    if root.exists() and not overwrite and read_marker(root, MARKER) is None and any(root.iterdir()):
        raise FileExistsError(
            f"`root` must be empty or hold an earlier demo build, got {str(root)!r} with other files. "
            "HINT: pick another directory or pass overwrite=True to replace it."
        )

    def write(tmp: Path) -> None:
        log.info("Writing the demo data to %s", root)
        _build(DemoPaths.under(tmp), progress=progress, **params)

    cached_build(root, {"version": DATA_VERSION, "params": params}, write, marker=MARKER, rebuild=overwrite)
    return DemoPaths.under(root)


def _check_int(name: str, value: int, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}. HINT: {hint}")
    return value


# ----------------------------------------------------------------------------------------------------- building


def _rng(seed: int, *stream: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), so changing one part never shifts another."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in stream)])


def _build(
    paths: DemoPaths,
    *,
    train_images: int,
    val_images: int,
    test_images: int,
    imagenet_train_images: int,
    imagenet_val_images: int,
    questions_per_image: int,
    image_size: int,
    seed: int,
    progress: Progress | None,
) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16 -> 10x10 uint8 images with a blank border, so upscaled strokes fade out at the edges
    glyphs = [Image.fromarray(np.pad(image * (255 / 16), 1).round().astype(np.uint8)) for image in digits.images]
    pools = _split_pools(digits.target, seed)
    sizes = {"train": train_images, "val": val_images, "test": test_images, "test2015": test_images}
    pool_of = {"train": "train", "val": "val", "test": "test", "test2015": "test"}
    scenes: dict[str, list[Scene]] = {}
    next_id = 1
    for split, count in sizes.items():
        rng = _rng(seed, "scenes", split)
        scenes[split] = [_sample_scene(rng, pools[pool_of[split]], next_id + i, image_size) for i in range(count)]
        next_id += count

    folders = {"train": "train2014", "val": "val2014", "test": "val2014", "test2015": "test2015"}
    nlvr2_split = {"train": "train", "val": "dev", "test": "test1"}
    for split, split_scenes in scenes.items():
        rng = _rng(seed, "render", split)
        for i, scene in enumerate(split_scenes):
            image = _render(scene, glyphs, image_size, rng)
            _save(image, paths.coco / _coco_file(folders[split], scene.image_id), "JPEG")
            if split in nlvr2_split and i < 2 * (len(split_scenes) // 2):
                _save(image, paths.nlvr2 / _nlvr2_image(nlvr2_split[split], i // 2, i % 2), "PNG")
            if progress is not None:
                progress(f"scenes {folders[split]}", i + 1, len(split_scenes))

    corpus: list[str] = []
    corpus += _write_coco(paths.coco, scenes, seed, image_size)
    corpus += _write_vqa(paths.vqav2, scenes, seed, questions_per_image)
    corpus += _write_nlvr2(paths.nlvr2, scenes, seed, nlvr2_split)
    imagenet = _write_imagenet(
        paths, glyphs, pools, seed, image_size, imagenet_train_images, imagenet_val_images, progress
    )
    corpus += list(CLASS_NAMES)
    paths.corpus.write_text("".join(f"{line}\n" for line in corpus))
    _write_json(
        paths.scenes,
        {
            "colours": COLOURS,
            "splits": {split: [asdict(scene) for scene in split_scenes] for split, split_scenes in scenes.items()},
            "imagenet": imagenet,
        },
    )


def _split_pools(targets: np.ndarray, seed: int) -> dict[str, list[np.ndarray]]:
    """Disjoint per-class sample pools: 70% train, 15% val, 15% test of each digit's samples."""
    rng = _rng(seed, "pools")
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for value in range(10):
        indices = rng.permutation(np.flatnonzero(targets == value))
        cut_train, cut_val = int(0.7 * len(indices)), int(0.85 * len(indices))
        pools["train"].append(indices[:cut_train])
        pools["val"].append(indices[cut_train:cut_val])
        pools["test"].append(indices[cut_val:])
    return pools


def _cell_digit(rng: np.random.Generator, value: int, column: int, pool: list[np.ndarray], image_size: int) -> Digit:
    """A digit of ``value`` centred in a random row of ``column`` of the image's 3x3 grid of cells, filling 3/4, 7/8
    or all of its cell, in a random colour and handwriting from ``pool``."""
    cell = image_size // 3
    size = cell - int(rng.integers(3)) * cell // 8
    x, y = (k * cell + (cell - size) // 2 for k in (column, int(rng.integers(3))))
    return Digit(value, str(rng.choice(list(COLOURS))), x, y, size, int(rng.choice(pool[value])), column)


def _sample_scene(rng: np.random.Generator, pool: list[np.ndarray], image_id: int, image_size: int) -> Scene:
    """1-3 distinct digit values in distinct columns of a 3x3 grid of cells, one digit per cell.

    Positions, sizes and colours vary while left/middle/right stay unambiguous, and a ViT whose patches are the
    cells (patch size ``image_size // 3``) sees every digit whole in one patch: small models learn the scenes in
    minutes on a CPU.
    """
    count = int(rng.integers(1, 4))
    values = rng.choice(10, size=count, replace=False)
    columns = np.sort(rng.choice(3, size=count, replace=False))
    digits = tuple(_cell_digit(rng, int(v), int(c), pool, image_size) for v, c in zip(values, columns, strict=True))
    return Scene(image_id, digits)


def _render(scene: Scene, glyphs: Sequence[Image.Image], image_size: int, rng: np.random.Generator) -> Image.Image:
    """A dark background with a random gradient; each digit's grey level is the alpha of its colour."""
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    slope = rng.uniform(-12.0, 12.0, size=(2, 3)).astype(np.float32)
    base = rng.uniform(12.0, 40.0, size=3).astype(np.float32)
    canvas = base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
    for digit in scene.digits:
        glyph = glyphs[digit.sample].resize((digit.size, digit.size), Image.Resampling.BILINEAR)
        alpha = np.asarray(glyph, np.float32)[..., None] * (float(rng.uniform(0.8, 1.0)) / 255.0)
        box = canvas[digit.y : digit.y + digit.size, digit.x : digit.x + digit.size]
        box[:] = box * (1.0 - alpha) + np.asarray(COLOURS[digit.colour], np.float32) * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def _save(image: Image.Image, path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "JPEG":
        image.save(path, "JPEG", quality=92, subsampling=0)
    else:
        image.save(path, "PNG")


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _coco_file(folder: str, image_id: int) -> str:
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


# ----------------------------------------------------------------------------------------------------- texts


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red 3", "an 8", "an eight", "a one"."""
    first = phrase.split()[0]
    vowel_sound = first[0] in "aeiu8" or (first[0] == "o" and first != "one")
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def _count_digits(count: int) -> str:
    return f"{NUMBER_WORDS[count]} digit{'' if count == 1 else 's'}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five different captions of the scene, drawn from a small set of templates."""
    digits, n = scene.digits, len(scene.digits)
    words = [NUMBER_WORDS[d.value] for d in digits]
    if n == 1:
        (d,), (w,) = digits, words
        templates = [
            _a(f"{d.colour} {d.value}"),
            f"one handwritten digit: {_a(f'{d.colour} {w}')}",
            f"a picture of {_a(f'handwritten {w}')} in {d.colour}",
            f"the digit {w} written in {d.colour}",
            f"{_a(f'{d.colour} {w}')} on a dark background",
            f"a single {d.colour} digit, the number {w}",
        ]
    else:
        coloured = [_a(f"{d.colour} {w}") for d, w in zip(digits, words, strict=True)]
        templates = [
            _join([_a(f"{d.colour} {d.value}") for d in digits]),
            f"{NUMBER_WORDS[n]} digits: "
            + _join(
                [
                    f"{c} {'in the' if s == 'middle' else 'on the'} {s}"
                    for c, s in zip(coloured, scene.sides, strict=True)
                ]
            ),
            f"a picture of {NUMBER_WORDS[n]} handwritten digits, {_join(words)}",
            f"the digits {_join(words)} in {_join([d.colour for d in digits])}",
            f"{coloured[0]} next to {_join(coloured[1:])}",
            "from left to right: " + ", ".join(f"{d.colour} {w}" for d, w in zip(digits, words, strict=True)),
            f"{NUMBER_WORDS[n]} handwritten digits on a dark background",
        ]
    return [templates[i] for i in rng.choice(len(templates), size=5, replace=False)]


class _QA(NamedTuple):
    question: str
    answer: str
    answer_type: str
    question_type: str
    choices: tuple[str, ...]  # plausible answers a careless annotator might give instead


_DIGITS = tuple(str(d) for d in range(10))
_YES_NO = ("yes", "no")


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _vqa_candidates(scene: Scene, rng: np.random.Generator) -> list[_QA]:
    """One question of every kind that applies to the scene, with random parameters."""
    digits, n = scene.digits, len(scene.digits)
    colours = [d.colour for d in digits]
    values = [d.value for d in digits]
    pick = int(rng.integers(n))
    side = "" if n == 1 else f" on the {scene.sides[pick]}" if scene.sides[pick] != "middle" else " in the middle"
    which = "the digit" if n == 1 else f"the {scene.sides[pick]} digit"
    colour = str(rng.choice(list(COLOURS)))
    asked = int(rng.choice(values)) if rng.random() < 0.5 else int(rng.choice(sorted(set(range(10)) - set(values))))
    parity = str(rng.choice(["even", "odd"]))
    counts = tuple(str(k) for k in range(4))
    qas = [
        _QA("how many digits are there?", str(n), "number", "how many", counts[1:]),
        _QA(f"how many {colour} digits are there?", str(colours.count(colour)), "number", "how many", counts),
        _QA(f"what digit is{side or ' shown'}?", str(values[pick]), "number", "what digit is", _DIGITS),
        _QA(f"what color is the {values[pick]}?", colours[pick], "other", "what color is the", tuple(COLOURS)),
        _QA(
            f"is {which} {parity}?", _yes_no((values[pick] % 2 == 0) == (parity == "even")), "yes/no", "is the", _YES_NO
        ),
        _QA(f"is there a {colour} digit?", _yes_no(colour in colours), "yes/no", "is there a", _YES_NO),
        _QA(f"is there {_a(str(asked))} in the image?", _yes_no(asked in values), "yes/no", "is there a", _YES_NO),
    ]
    sizes = sorted(d.size for d in digits)
    if n > 1 and sizes[-1] - sizes[-2] >= 4:
        largest = max(digits, key=lambda d: d.size)
        qas.append(_QA("which digit is the largest?", str(largest.value), "number", "which", _DIGITS))
    return qas


def _human_answers(qa: _QA, rng: np.random.Generator) -> list[dict]:
    """Ten annotators: mostly right, sometimes a synonym ("2" / "two"), occasionally wrong and less confident."""
    kinds, confidences = rng.random(10), rng.random(10)
    wrong = [c for c in qa.choices if c != qa.answer]
    picks = rng.integers(len(wrong), size=10)
    answers = []
    for answer_id, (kind, confidence, pick) in enumerate(zip(kinds, confidences, picks, strict=True), start=1):
        if kind < 0.9:  # right, 1 in 9 of those phrased as a number word
            synonym = kind >= 0.8 and qa.answer.isdigit()
            answer = NUMBER_WORDS[int(qa.answer)] if synonym else qa.answer
            level = "yes" if confidence < 0.85 else "maybe" if confidence < 0.97 else "no"
        else:
            answer = wrong[pick]
            level = "yes" if confidence < 0.2 else "maybe" if confidence < 0.7 else "no"
        answers.append({"answer": answer, "answer_confidence": level, "answer_id": answer_id})
    return answers


def _most_common(answers: list[dict]) -> str:
    """The most frequent answer, counting "two" as "2" (as VQA accuracy does): always in `ANSWER_VOCABULARY`."""
    digit_of = {word: str(d) for d, word in enumerate(NUMBER_WORDS)}
    return Counter(digit_of.get(a["answer"], a["answer"]) for a in answers).most_common(1)[0][0]


def _statement(left: Scene, right: Scene, rng: np.random.Generator) -> tuple[str, bool]:
    """A random NLVR2-style statement about an image pair and whether it holds."""
    scenes = {"left": left, "right": right}
    side = str(rng.choice(["left", "right"]))
    other = "right" if side == "left" else "left"
    one, two = scenes[side], scenes[other]
    colour = str(rng.choice(list(COLOURS)))
    value = int(rng.integers(10))
    count = int(rng.integers(1, 4))

    def has_colour(scene: Scene) -> bool:
        return any(d.colour == colour for d in scene.digits)

    def has_value(scene: Scene) -> bool:
        return any(d.value == value for d in scene.digits)

    kind = int(rng.integers(9))
    if kind == 0:
        return f"the {side} image contains more digits than the {other} image", len(one.digits) > len(two.digits)
    if kind == 1:
        return f"both images contain {_a(colour)} digit", has_colour(left) and has_colour(right)
    if kind == 2:
        total = int(rng.integers(2, 7))
        return f"there are {NUMBER_WORDS[total]} digits in total", len(left.digits) + len(right.digits) == total
    if kind == 3:
        return f"the {side} image contains exactly {_count_digits(count)}", len(one.digits) == count
    if kind == 4:
        return f"the {side} image contains {_a(f'handwritten {NUMBER_WORDS[value]}')}", has_value(one)
    if kind == 5:
        return f"exactly one image contains {_a(colour)} digit", has_colour(left) != has_colour(right)
    if kind == 6:
        return "both images contain the same number of digits", len(left.digits) == len(right.digits)
    if kind == 7:
        return f"every digit in the {side} image is {colour}", all(d.colour == colour for d in one.digits)
    return f"{_a(NUMBER_WORDS[value])} appears in both images", has_value(left) and has_value(right)


def _true_and_false(left: Scene, right: Scene, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """One true and one false statement about the pair, in random order (so every split is balanced)."""
    found: dict[bool, str] = {}
    for _ in range(200):
        sentence, truth = _statement(left, right, rng)
        found.setdefault(truth, sentence)
        if len(found) == 2:
            break
    else:  # nine kinds with random parameters make this practically unreachable; stay total anyway
        n = len(left.digits)
        found = {
            True: f"the left image contains exactly {_count_digits(n)}",
            False: f"the left image contains exactly {_count_digits(n % 3 + 1)}",
        }
    pair = [(found[True], True), (found[False], False)]
    return pair if rng.random() < 0.5 else pair[::-1]


# ----------------------------------------------------------------------------------------------------- writers


def _write_coco(coco: Path, scenes: dict[str, list[Scene]], seed: int, image_size: int) -> list[str]:
    """Official `captions_{train,val}2014.json` and the Karpathy split; returns the training captions."""
    captions = {
        split: [_captions(scene, _rng(seed, "captions", split, str(scene.image_id))) for scene in scenes[split]]
        for split in ("train", "val", "test")
    }
    annotation_id = 1
    for folder, splits in (("train2014", ("train",)), ("val2014", ("val", "test"))):
        images, annotations = [], []
        for split in splits:
            for scene, texts in zip(scenes[split], captions[split], strict=True):
                images.append(_coco_image(folder, scene.image_id, image_size))
                for text in texts:
                    annotations.append({"image_id": scene.image_id, "id": annotation_id, "caption": text})
                    annotation_id += 1
        document = {"info": _INFO, "licenses": [_LICENSE], "images": images, "annotations": annotations}
        _write_json(coco / "annotations" / f"captions_{folder}.json", document)
    karpathy_train = [
        {"caption": text, "image": _coco_file("train2014", scene.image_id), "image_id": f"coco_{scene.image_id}"}
        for scene, texts in zip(scenes["train"], captions["train"], strict=True)
        for text in texts
    ]
    _write_json(coco / "annotations" / "coco_karpathy_train.json", karpathy_train)
    for split in ("val", "test"):
        entries = [
            {"image": _coco_file("val2014", scene.image_id), "caption": texts}
            for scene, texts in zip(scenes[split], captions[split], strict=True)
        ]
        _write_json(coco / "annotations" / f"coco_karpathy_{split}.json", entries)
    return [text for texts in captions["train"] for text in texts]


def _coco_image(folder: str, image_id: int, image_size: int) -> dict:
    file_name = f"COCO_{folder}_{image_id:012d}.jpg"
    return {
        "license": 1,
        "file_name": file_name,
        "coco_url": f"synthetic://ecoflap-demo/{folder}/{file_name}",
        "height": image_size,
        "width": image_size,
        "date_captured": "2014-01-01 00:00:00",
        "flickr_url": "",
        "id": image_id,
    }


def _write_vqa(vqa: Path, scenes: dict[str, list[Scene]], seed: int, per_image: int) -> list[str]:
    """Official VQAv2 question and annotation files (test2015 and test-dev2015 without annotations)."""
    corpus: list[str] = []
    subsets = {"train2014": ("train",), "val2014": ("val", "test"), "test2015": ("test2015",)}
    for subset, splits in subsets.items():
        questions, annotations = [], []
        for split in splits:
            for scene in scenes[split]:
                rng = _rng(seed, "vqa", split, str(scene.image_id))
                candidates = _vqa_candidates(scene, rng)
                chosen = rng.choice(len(candidates), size=min(per_image, len(candidates)), replace=False)
                for k, index in enumerate(chosen):
                    qa = candidates[index]
                    question_id = scene.image_id * 1000 + k
                    questions.append({"image_id": scene.image_id, "question": qa.question, "question_id": question_id})
                    answers = _human_answers(qa, rng)
                    annotations.append(
                        {
                            "question_type": qa.question_type,
                            "multiple_choice_answer": _most_common(answers),
                            "answers": answers,
                            "image_id": scene.image_id,
                            "answer_type": qa.answer_type,
                            "question_id": question_id,
                        }
                    )
                    if split == "train":
                        corpus += [qa.question, *(a["answer"] for a in answers)]
        header = {"info": _INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": _LICENSE}
        _write_json(
            vqa / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            {**header, "data_subtype": subset, "questions": questions},
        )
        if subset == "test2015":
            dev = questions[: len(questions) // 2]
            _write_json(
                vqa / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                {**header, "data_subtype": "test-dev2015", "questions": dev},
            )
        else:
            _write_json(
                vqa / f"v2_mscoco_{subset}_annotations.json",
                {
                    "info": _INFO,
                    "license": _LICENSE,
                    "data_type": "mscoco",
                    "data_subtype": subset,
                    "annotations": annotations,
                },
            )
    _write_json(vqa / "answer_list.json", list(ANSWER_VOCABULARY))
    return corpus


def _nlvr2_image(split: str, pair: int, side: int) -> str:
    name = f"{split}-{pair}-0-img{side}.png"
    return f"train/{pair % 10}/{name}" if split == "train" else f"{split}/{name}"


def _write_nlvr2(nlvr2: Path, scenes: dict[str, list[Scene]], seed: int, names: dict[str, str]) -> list[str]:
    """`{train,dev,test1}.json`: two statements (one true, one false) per consecutive pair of scenes."""
    corpus: list[str] = []
    for split, name in names.items():
        rng = _rng(seed, "nlvr2", split)
        lines = []
        for pair in range(len(scenes[split]) // 2):
            left, right = scenes[split][2 * pair], scenes[split][2 * pair + 1]
            for k, (sentence, truth) in enumerate(_true_and_false(left, right, rng)):
                label = str(truth)
                votes = [label if rng.random() < 0.95 else str(not truth) for _ in range(3)]
                line: dict[str, Any] = {
                    "validation": {
                        str(int(w)): v for w, v in zip(rng.choice(100, 3, replace=False), votes, strict=True)
                    },
                    "sentence": sentence,
                    "left_url": f"synthetic://ecoflap-demo/nlvr2/{_nlvr2_image(name, pair, 0)}",
                    "writer": str(int(rng.integers(100))),
                    "label": label,
                    "right_url": f"synthetic://ecoflap-demo/nlvr2/{_nlvr2_image(name, pair, 1)}",
                    "synset": "handwritten digit",
                    "query": f"handwritten digit{pair}",
                    "identifier": f"{name}-{pair}-0-{k}",
                }
                if name == "train":
                    line["directory"] = pair % 10
                lines.append(json.dumps(line))
                if name == "train":
                    corpus.append(sentence)
        (nlvr2 / f"{name}.json").write_text("".join(f"{line}\n" for line in lines))
    return corpus


def _write_imagenet(
    paths: DemoPaths,
    glyphs: Sequence[Image.Image],
    pools: dict[str, list[np.ndarray]],
    seed: int,
    image_size: int,
    train_images: int,
    val_images: int,
    progress: Progress | None,
) -> dict[str, list[dict]]:
    """Per-wnid train/val folders, the flat Kaggle val variant and the class-name file; returns the ground truth."""
    mapping = "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, CLASS_NAMES, strict=True))
    truth: dict[str, list[dict]] = {}
    solution = ["ImageId,PredictionString"]
    for split, count, pool in (("train", train_images, "train"), ("val", val_images, "val")):
        rng = _rng(seed, "imagenet", split)
        truth[split] = []
        per_class = [0] * 10
        for i in range(count):
            value = i % 10
            digit = _cell_digit(rng, value, int(rng.integers(3)), pools[pool], image_size)
            x, y, size = digit.x, digit.y, digit.size
            image = _render(Scene(i + 1, (digit,)), glyphs, image_size, rng)
            wnid = WNIDS[value]
            if split == "train":
                file = f"train/{wnid}/{wnid}_{per_class[value]}.JPEG"
            else:
                stem = f"ILSVRC2012_val_{i + 1:08d}"
                file = f"val/{wnid}/{stem}.JPEG"
                solution.append(f"{stem},{wnid} {x} {y} {x + size - 1} {y + size - 1}")
            per_class[value] += 1
            buffer = BytesIO()
            image.save(buffer, "JPEG", quality=92, subsampling=0)
            _write_bytes(paths.imagenet / file, buffer.getvalue())
            if split == "val":
                _write_bytes(paths.imagenet_flat / "val" / Path(file).name, buffer.getvalue())
            truth[split].append({"file": file, "label": value, **asdict(digit)})
            if progress is not None:
                progress(f"imagenet {split}", i + 1, count)
    for folder in (paths.imagenet, paths.imagenet_flat):
        (folder / "LOC_synset_mapping.txt").write_text(mapping)
        _write_json(folder / "class_names.json", dict(zip(WNIDS, CLASS_NAMES, strict=True)))
    (paths.imagenet_flat / "LOC_val_solution.csv").write_text("".join(f"{row}\n" for row in solution))
    (paths.imagenet_flat / "train").symlink_to(Path("..") / "imagenet" / "train", target_is_directory=True)
    return truth


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
