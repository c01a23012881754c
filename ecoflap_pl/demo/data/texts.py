"""Every text of the demo, generated from a scene's ground truth: captions, VQA questions with ten human answers,
and NLVR2 statements about an image pair."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ecoflap_pl.demo.data.scenes import COLOURS, NUMBER_WORDS, Scene


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red 3", "an 8", "an eight", "a one"."""
    first = phrase.split()[0]
    vowel_sound = first[0] in "aeiu8" or (first[0] == "o" and first != "one")
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def _count_digits(count: int) -> str:
    return f"{NUMBER_WORDS[count]} digit{'' if count == 1 else 's'}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
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


class QA(NamedTuple):
    """A VQA question about a scene, its answer and the official answer and question types."""

    question: str
    answer: str
    answer_type: str
    question_type: str
    choices: tuple[str, ...]  # plausible answers a careless annotator might give instead


_DIGITS = tuple(str(d) for d in range(10))
_YES_NO = ("yes", "no")


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def vqa_candidates(scene: Scene, rng: np.random.Generator) -> list[QA]:
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
        QA("how many digits are there?", str(n), "number", "how many", counts[1:]),
        QA(f"how many {colour} digits are there?", str(colours.count(colour)), "number", "how many", counts),
        QA(f"what digit is{side or ' shown'}?", str(values[pick]), "number", "what digit is", _DIGITS),
        QA(f"what color is the {values[pick]}?", colours[pick], "other", "what color is the", tuple(COLOURS)),
        QA(
            f"is {which} {parity}?", _yes_no((values[pick] % 2 == 0) == (parity == "even")), "yes/no", "is the", _YES_NO
        ),
        QA(f"is there a {colour} digit?", _yes_no(colour in colours), "yes/no", "is there a", _YES_NO),
        QA(f"is there {_a(str(asked))} in the image?", _yes_no(asked in values), "yes/no", "is there a", _YES_NO),
    ]
    sizes = sorted(d.size for d in digits)
    if n > 1 and sizes[-1] - sizes[-2] >= 4:
        largest = max(digits, key=lambda d: d.size)
        qas.append(QA("which digit is the largest?", str(largest.value), "number", "which", _DIGITS))
    return qas


def human_answers(qa: QA, rng: np.random.Generator) -> list[dict]:
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


def most_common_answer(answers: list[dict]) -> str:
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


def true_and_false(left: Scene, right: Scene, rng: np.random.Generator) -> list[tuple[str, bool]]:
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
