"""The documentation stays true to the tree: every repository path it names exists, every link and anchor resolves,
every config it lists exists (and every config is listed), every ``ecoflap`` option it names is one the command
takes, and every ``docs/*.md`` the code cites is part of the repository.

A path is a backticked token (or an entry of a fenced file tree) that starts with a top-level entry of the
repository (``ecoflap_pl/pruning/fine.py``, ``configs/demo/``), or a bare Python file name (``fine.py``,
``allocation/ecoflap.py``), which must be the end of some file's path; or, anywhere in the text (commands
included), a word that starts with a top-level folder and a ``/``. Dataset layouts (``annotations/...json``), output
files (``pruning_report.json``) and git-ignored output folders (``runs/``) name no repository path and are not
checked.
"""

from __future__ import annotations

import inspect
import re
from fnmatch import fnmatch
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


def _ignored(name: str) -> bool:
    """Whether a top-level entry is git-ignored (a virtual environment, ``runs/`` of the demo), per ``.gitignore``."""
    gitignore = ROOT / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.is_file() else []
    patterns = [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]
    return any(fnmatch(name, pattern) for pattern in patterns)


def _top_level() -> set[str]:
    return {entry.name for entry in ROOT.iterdir() if not entry.name.startswith(".git") and not _ignored(entry.name)}


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


def _paths_in_text(document: Path) -> list[str]:
    """Every word of ``document`` (commands and fenced blocks included) that starts with a top-level folder of the
    repository and a ``/``, e.g. ``-c configs/demo/blip2_vqa.yaml``; patterns (``{...}``, ``<...>``, ``*``) are
    skipped."""
    folders = sorted(name for name in _top_level() if (ROOT / name).is_dir())
    word = re.compile(rf"(?<![\w./<{{-])((?:{'|'.join(map(re.escape, folders))})/[\w./-]*)(?![\w./-]*[{{<*])")
    return [match.group(1).rstrip(".") for match in word.finditer(document.read_text(encoding="utf-8"))]


def _missing(paths: list[str]) -> list[str]:
    python_files = _python_files()
    missing = []
    for path in paths:
        stripped = path.rstrip("/")
        installed = next((folder for folder in INSTALLED_AS if stripped.startswith(f"{folder}/")), None)
        real = INSTALLED_AS.get(stripped, stripped)
        if installed is not None:
            real = INSTALLED_AS[installed] + stripped.removeprefix(installed)
        if path.split("/")[0] in _top_level():
            found = (ROOT / real).exists()
        else:  # a bare or partial Python file name: the end of some file's path
            found = any(file == real or file.endswith(f"/{real}") for file in python_files)
        if not found:
            missing.append(path)
    return missing


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_path_a_document_names_exists(document: Path) -> None:
    named = _named_paths(document) + _paths_in_text(document)
    assert _missing(named) == []


LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(document: Path) -> list[str]:
    """The relative links of ``document`` whose file, or whose ``#anchor`` in a Markdown file, does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text(encoding="utf-8")), re.MULTILINE)
            if anchor not in {_anchor(heading) for heading in headings}:
                broken.append(target)
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_link_and_anchor_resolves(document: Path) -> None:
    assert _broken_links(document) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## When files are checked\n", encoding="utf-8")
    document = tmp_path / "doc.md"
    document.write_text(
        "[a](other.md#when-files-are-checked), [b](other.md#no-such-part), [c](gone.md), [d](#other-page), "
        "[e](https://example.org/x#y)\n\n# Here\n",
        encoding="utf-8",
    )
    assert _broken_links(document) == ["other.md#no-such-part", "gone.md", "#other-page"]


def _expand(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``blip2_{opt,t5}_vqa`` -> ``blip2_opt_vqa``, ``blip2_t5_vqa``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [
        name
        for option in match.group(1).split(",")
        for name in _expand(pattern[: match.start()] + option + pattern[match.end() :])
    ]


def _configs(folder: str) -> set[str]:
    return {path.stem for path in (ROOT / "configs" / folder).glob("*.yaml")}


def _first_column(text: str, header: str) -> set[str]:
    """The backticked names (braces expanded) in the first column of the table whose header row contains ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header in line)
    names: set[str] = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names |= {name for token in BACKTICKED.findall(line.split("|")[1]) for name in _expand(token)}
    return names


def _tree_listing(text: str) -> dict[str, set[str]]:
    """Folder -> config names of the fenced ``configs/`` tree of configs/README.md (comments in brackets dropped)."""
    block = next(block for _, block in FENCE.findall(text) if block.startswith("configs/\n"))
    listing: dict[str, set[str]] = {}
    folder = ""
    for line in block.splitlines()[1:]:
        words = re.sub(r"\(.*?\)", "", line).split()
        if words and words[0].endswith("/"):
            folder, words = words[0].rstrip("/"), words[1:]
        listing.setdefault(folder, set()).update(name for word in words for name in _expand(word))
    return listing


def test_the_config_listings_match_the_configs_folder() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    configs_readme = (ROOT / "configs" / "README.md").read_text(encoding="utf-8")
    folders = sorted(path.name for path in (ROOT / "configs").iterdir() if path.is_dir())
    assert _tree_listing(configs_readme) == {folder: _configs(folder) for folder in folders}
    assert _first_column(configs_readme, "| file | allocation |") == _configs("pruning")
    assert _first_column(readme, "experiment (`configs/experiments/`)") == _configs("experiments")
    assert _first_column(readme, "demo config (`configs/demo/`)") == _configs("demo")
    presets = readme.split("Pruning presets (`configs/pruning/`):")[1].split("Append one")[0]
    assert {token for token in BACKTICKED.findall(presets) if re.fullmatch(r"\w+", token)} == _configs("pruning")


def test_brace_expansion() -> None:
    assert _expand("blip2_{a,b}_{c,d}") == ["blip2_a_c", "blip2_a_d", "blip2_b_c", "blip2_b_d"]
    assert _expand("plain") == ["plain"]


# An option of the `ecoflap` command: `--pruning.save_to`, `--model.init_args.device_map`, or a backticked token that
# is the option itself or `option: value` (`pruning.stages`, `data.init_args.data_dir`).
OPTION = re.compile(r"--(pruning|model\.init_args|data\.init_args|trainer)\.(\w+)")
BACKTICKED_OPTION = re.compile(r"^(pruning|model\.init_args|data\.init_args|trainer)\.(\w+)(?::.*)?$")


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def _init_arguments(classes: list[type]) -> set[str]:
    return {name for cls in classes for name in inspect.signature(cls.__init__).parameters} - {"self", "kwargs"}


def _options() -> dict[str, set[str]]:
    """Section -> the argument names the ``ecoflap`` command takes there (every task and DataModule it ships)."""
    import lightning.pytorch as pl

    import ecoflap_pl.demo.datamodules
    import ecoflap_pl.demo.tasks
    import ecoflap_pl.tasks  # noqa: F401  (the imports register the subclasses)
    from ecoflap_pl.callbacks import ECoFLaPPruning
    from ecoflap_pl.datamodules import EcoflapDataModule
    from ecoflap_pl.tasks.base import EcoflapTask

    return {
        "pruning": _init_arguments([ECoFLaPPruning]),
        "model.init_args": _init_arguments(_subclasses(EcoflapTask)),
        "data.init_args": _init_arguments(_subclasses(EcoflapDataModule)),
        "trainer": _init_arguments([pl.Trainer]),
    }


def _unknown_options(text: str, options: dict[str, set[str]]) -> list[str]:
    named = OPTION.findall(text)
    named += [match.groups()[:2] for token in BACKTICKED.findall(text) if (match := BACKTICKED_OPTION.match(token))]
    return sorted({f"{section}.{name}" for section, name in named if name not in options[section]})


def test_every_option_a_document_names_exists() -> None:
    options = _options()
    unknown = {
        document.relative_to(ROOT).as_posix(): _unknown_options(document.read_text(encoding="utf-8"), options)
        for document in DOCUMENTS
    }
    assert {document: names for document, names in unknown.items() if names} == {}


def test_an_unknown_option_is_reported() -> None:
    options = {"pruning": {"save_to"}, "model.init_args": {"device_map"}, "data.init_args": set(), "trainer": set()}
    text = (
        "`--pruning.save_to DIR --pruning.save_too x`, `pruning.sav: 1`, `model.init_args.device_map`, "
        "`--model.init_args.devices_map auto`, `trainer.strategy.reduce(x)`, `ecoflap_pl.pruning.masks`"
    )
    assert _unknown_options(text, options) == ["model.init_args.devices_map", "pruning.sav", "pruning.save_too"]


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
