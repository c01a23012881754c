"""The documentation stays true to the tree: every repository path it names exists, and every ``docs/*.md`` the code
cites is part of the repository.

A path is a backticked token (or an entry of a fenced file tree) that starts with a top-level entry of the
repository (``ecoflap_pl/pruning/fine.py``, ``configs/demo/``), or a bare Python file name (``fine.py``,
``allocation/ecoflap.py``), which must be the end of some file's path. Dataset layouts (``annotations/...json``)
and output files (``pruning_report.json``) name no repository path and are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "configs" / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BACKTICKED = re.compile(r"`([^`\n]+)`")
TREE_ENTRY = re.compile(r"^( *)(\S+)")
FILE_NAME = re.compile(r"^[\w.-]+/?$")
# The installed names of the two top-level folders mapped into the package by `[tool.setuptools.package-dir]`.
INSTALLED_AS = {"ecoflap_pl/callbacks": "callbacks", "ecoflap_pl/datamodules": "datamodules"}


def _top_level() -> set[str]:
    return {entry.name for entry in ROOT.iterdir() if not entry.name.startswith(".git")}


# The project's own sources: a checkout may also hold virtual environments (`.venv/`, `venv/`), run outputs and caches.
SOURCE_FOLDERS = ("ecoflap_pl", "callbacks", "datamodules", "configs", "benchmarks", "tests", "docs")


def _sources(pattern: str) -> list[Path]:
    return [path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob(pattern)] + sorted(ROOT.glob(pattern))


def _python_files() -> list[str]:
    return [path.relative_to(ROOT).as_posix() for path in _sources("*.py")]


def _tree_paths(block: str, top_level: set[str]) -> list[str]:
    """The paths of a fenced file tree: one entry per line, two spaces of indentation per level, folders end in
    ``/``, files have an extension; a line indented deeper than a child of the entry above continues its comment.
    A block whose first entry is not a top-level entry of the repository is not a tree of it."""
    paths: list[str] = []
    parents: list[tuple[int, str]] = []  # (indentation, folder path) of the enclosing folders
    last_indent = 0
    for line in block.splitlines():
        match = TREE_ENTRY.match(line)
        if match is None:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if not paths and (indent > 0 or name.rstrip("/") not in top_level):
            return []
        if (paths and indent > last_indent + 2) or not FILE_NAME.match(name):
            continue  # a comment's continuation line, or a word of a listing
        if not name.endswith("/") and "." not in name:
            continue  # a word of a listing, not a file name
        last_indent = indent
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = f"{parents[-1][1]}{name}" if parents else name
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def _named_paths(document: Path) -> list[str]:
    """The repository paths ``document`` names, in backticks and in fenced file trees."""
    text, top_level = document.read_text(encoding="utf-8"), _top_level()
    named: list[str] = []
    for language, block in FENCE.findall(text):
        if not language:
            named += _tree_paths(block, top_level)
    for token in BACKTICKED.findall(FENCE.sub("", text)):
        path = token.strip().split("::")[0]
        if " " in path or "{" in path or "*" in path or "<" in path:
            continue  # a command, a pattern or a template, not one path
        if path.split("/")[0] in top_level or path.endswith(".py"):
            named.append(path)
    return named


def _missing(paths: list[str]) -> list[str]:
    python_files = _python_files()
    missing = []
    for path in paths:
        stripped = path.rstrip("/")
        real = INSTALLED_AS.get(stripped, stripped)
        if path.split("/")[0] in _top_level():
            found = (ROOT / real).exists()
        else:  # a bare or partial Python file name: the end of some file's path
            found = any(file == real or file.endswith(f"/{real}") for file in python_files)
        if not found:
            missing.append(path)
    return missing


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_path_a_document_names_exists(document: Path) -> None:
    named = _named_paths(document)
    assert _missing(named) == []


def test_the_readme_and_the_architecture_name_many_paths() -> None:
    # The parser would pass trivially if it found nothing: both documents are largely about where things live.
    assert len(_named_paths(ROOT / "README.md")) >= 10
    tree = _named_paths(ROOT / "docs" / "architecture.md")
    assert {"ecoflap_pl/pruning/fine.py", "callbacks/pruning.py", "docs/"} <= set(tree)


def test_a_missing_path_is_reported(tmp_path: Path) -> None:
    document = tmp_path / "doc.md"
    document.write_text(
        "See `ecoflap_pl/pruning/no_such.py`, `no_such_module.py`, `ecoflap_pl/pruning/fine.py`, `fine.py` and\n"
        "`pruning_report.json`.\n\n```\necoflap_pl/\n  pruning/\n    gone.py     described on\n"
        "                (two.py) lines\n    fine.py\n```\n",
        encoding="utf-8",
    )
    assert _missing(_named_paths(document)) == [
        "ecoflap_pl/pruning/gone.py",
        "ecoflap_pl/pruning/no_such.py",
        "no_such_module.py",
    ]


def test_the_code_cites_only_documents_of_the_repository() -> None:
    cited = re.compile(r"\b((?:docs|configs|benchmarks)/[\w/]+\.md|[A-Z_]+\.md)\b")
    sources = [path for suffix in ("*.py", "*.yaml") for path in _sources(suffix)]
    missing = sorted(
        f"{source.relative_to(ROOT)}: {name}"
        for source in sources
        for name in cited.findall(source.read_text(encoding="utf-8"))
        if not (ROOT / name).exists() and not (source.parent / name).exists()
    )
    assert missing == []
