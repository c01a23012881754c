"""Reading helpers shared by every DataModule: files, JSON, entry checks and images, with errors that say what to fix.

Every error names the exact path, the DataModule option that sets it and, for a sample, the annotation it came from.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
"""PIL modes of a 16-bit grayscale image (a 16-bit PNG opens as ``I;16``, or as ``I`` in older Pillow)."""


class DataFileNotFoundError(FileNotFoundError):
    """An annotation file or an image is not where the DataModule looked for it."""


class DataFormatError(ValueError):
    """An annotation file or an image exists but cannot be read as the expected format."""


def resolve(root: Path, path: str | Path) -> Path:
    """``path`` itself when absolute, else ``root / path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def find_file(candidates: Sequence[Path], option: str, what: str) -> Path:
    """The first existing file among ``candidates``.

    Args:
        candidates: paths in order of preference.
        option: the DataModule option that sets the path, named in the error.
        what: what the file is, e.g. ``"VQAv2 questions for split 'val2014'"``.

    Raises:
        DataFileNotFoundError: none of the candidates exists; the message lists every path looked for.
    """
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DataFileNotFoundError(
        f"{what} not found: expected {looked if len(candidates) == 1 else 'one of ' + looked}. "
        f"HINT: set `{option}` to the file's path (absolute, or relative to `data_dir`)."
    )


def locate(root: Path, override: str | None, defaults: Sequence[Path], option: str, what: str) -> Path:
    """The file ``override`` names (relative to ``root``) when set, else the first existing of ``defaults``."""
    return find_file([resolve(root, override)] if override is not None else defaults, option, what)


def find_dir(path: Path, option: str, what: str) -> Path:
    """``path`` when it is a directory, else a :class:`DataFileNotFoundError` naming it and ``option``."""
    if not path.is_dir():
        raise DataFileNotFoundError(
            f"{what} not found: expected the directory {path}. HINT: set `{option}` to its path "
            "(absolute, or relative to `data_dir`)."
        )
    return path


def check_image_folder(folder: Path, option: str, hint: str) -> Path:
    """``folder`` when it is a directory, else a :class:`DataFileNotFoundError` naming the first missing folder on
    its path (``image_root`` itself when that is wrong), ``option`` and ``hint``."""
    if not folder.is_dir():
        raise DataFileNotFoundError(f"{_missing_folder(str(folder), option)}. HINT: {hint}")
    return folder


def check_image_files(images: Iterable[tuple[str, str]], option: str, hint: str) -> None:
    """Check that every image file exists, before any is read.

    Each distinct folder is listed once (``os.scandir``) and the file names are looked up in the listing; a name
    missing from it is looked up on its own (a case-insensitive file system opens ``X.JPEG`` as ``x.jpeg``). COCO's
    Karpathy training split (113,287 images named by 566,435 samples, in 2 folders) is checked in about 0.4 s on a
    shared 2-core machine, local disk, with 218 system calls instead of a ``stat`` per image
    (``benchmarks/image_check.py``; figures in ``benchmarks/RESULTS.md``). Only existence is checked: opening every
    image up front would take minutes, so an unreadable image is reported by :func:`load_image` when its sample is
    read.

    Args:
        images: ``(path, source)`` of each image of each sample; ``source`` is the annotation that references it
            (``"image_id 5 (/data/x.json, entry 3)"``).
        option: the DataModule option that sets the image folder, named in the error.
        hint: what sets the image folder, the error's ``HINT``.

    Raises:
        DataFileNotFoundError: an image file or folder does not exist. A missing folder is named once (the first
            missing folder on its path) with the number of images in it; missing files are counted, with up to three
            of them and their sources.
    """
    sources: dict[str, str] = {}
    for path, source in images:
        sources.setdefault(path, source)
    by_folder: dict[str, list[str]] = {}
    for path in sources:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    missing_folders: dict[str, int] = {}
    missing_files: list[str] = []
    for folder, paths in by_folder.items():
        try:
            with os.scandir(folder or os.curdir) as entries:
                present = {entry.name for entry in entries}
        except OSError:
            if not os.path.isdir(folder or os.curdir):
                top = _first_missing(folder)
                missing_folders[top] = missing_folders.get(top, 0) + len(paths)
                continue
            present = set()  # a folder that cannot be listed: each file is looked up on its own
        missing_files.extend(p for p in paths if os.path.basename(p) not in present and not os.path.exists(p))
    if missing_folders or missing_files:
        raise DataFileNotFoundError(_missing_images(missing_folders, missing_files, sources, option, hint))


def _missing_images(folders: dict[str, int], files: list[str], sources: dict[str, str], option: str, hint: str) -> str:
    total = len(sources)
    lines = []
    if len(folders) == 1:
        ((folder, count),) = folders.items()
        lines.append(f"{_missing_folder(folder, option)} (it should hold {count:,} of the {total:,} images).")
    elif folders:
        named = ", ".join(list(folders)[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        count = sum(folders.values())
        lines.append(
            f"Image folders {named} (set by `{option}`) do not exist (they should hold {count:,} of the {total:,} "
            "images)."
        )
    if files:
        lines.append(
            f"Missing images: {len(files):,} of the {total:,} that the annotations name (image folder set by "
            f"`{option}`), e.g.:"
        )
        lines.extend(f"  {path} (for {sources[path]})" for path in files[:3])
    lines.append(f"HINT: {hint}")
    return "\n".join(lines)


def _missing_folder(folder: str, option: str) -> str:
    """``Image folder X (set by `option`) does not exist``, X the first folder on ``folder``'s path that is missing."""
    top = _first_missing(folder)
    state = "is not a folder" if os.path.exists(top) else "does not exist"
    return f"Image folder {top} (set by `{option}`) {state}"


def _first_missing(folder: str) -> str:
    """The first folder on ``folder``'s path, from the root down, that is not a directory (``folder`` at the latest):
    every folder below it is missing too."""
    while (parent := os.path.dirname(folder)) not in ("", folder) and not os.path.isdir(parent):
        folder = parent
    return folder


def read_json(path: Path, option: str) -> Any:
    """Parse the JSON file at ``path`` (set by ``option``), turning I/O and syntax errors into clear ones.

    Raises:
        DataFileNotFoundError: no file at ``path``.
        DataFormatError: the file is not UTF-8 JSON; the message says where it stops parsing (line and column), whether
            it is empty or cut short, and how to get a good copy.
    """
    _check_file(path, option)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path} (set by `{option}`) is not valid JSON: {_json_problem(err, 'the file')}. {damaged_hint(option)}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} (set by `{option}`) {not_utf8(err)}. {damaged_hint(option)}") from err


def read_json_lines(path: Path, option: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-empty line of the JSON-lines file at ``path`` (gzip if ``.gz``).

    Raises:
        DataFileNotFoundError: no file at ``path``.
        DataFormatError: a line that is not JSON (its number and column; a last line cut short is said to be), text
            that is not UTF-8, or a ``.gz`` file that is not complete gzip data.
    """
    _check_file(path, option)
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")
    try:
        with opened as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    # only the file's last line can lack its newline: a file cut short ends inside it
                    problem = _json_problem(err, "the file" if not line.endswith("\n") else "the line", line=True)
                    raise DataFormatError(
                        f"{path} (set by `{option}`), line {number} is not valid JSON: {problem}; the file must hold "
                        f"one JSON object per line. {damaged_hint(option)}"
                    ) from err
                yield number, entry
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} (set by `{option}`) {not_utf8(err)}. {damaged_hint(option)}") from err
    except (OSError, EOFError, zlib.error) as err:  # gzip: not gzip data, a cut or damaged stream
        raise DataFormatError(f"{path} (set by `{option}`) cannot be read: {err}. {damaged_hint(option)}") from err


def _check_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise DataFileNotFoundError(
            f"Annotation file not found: expected {path}. HINT: set `{option}` to its path "
            "(absolute, or relative to `data_dir`)."
        )


def _json_problem(err: json.JSONDecodeError, ending: str, line: bool = False) -> str:
    """What is wrong where, for a whole JSON file or (``line``) one line of a JSON-lines file, ``err``'s position given
    by its column only: empty; ending before its JSON is complete, said of ``ending`` (``"the file"``: it is cut
    short; ``"the line"``: one object spread over several lines); else ``err``'s message and position."""
    if not err.doc.strip():
        return "the file is empty"
    where = f"column {err.colno}" if line else f"line {err.lineno}, column {err.colno}"
    problem = f"{err.msg.removesuffix(' at')} at {where}"  # "Unterminated string starting at": its message ends so
    # A string that runs to the end is "Unterminated" at its start; anything else cut short fails at the very end.
    if err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string"):
        cut = ": it is cut short" if ending == "the file" else ""
        return f"{ending} ends before its JSON is complete ({problem}){cut}"
    return problem


def not_utf8(err: UnicodeDecodeError) -> str:
    """``is not UTF-8 text (...)``: what follows a file's path when ``err`` was raised decoding it."""
    return f"is not UTF-8 text ({err.reason} at byte {err.start:,}): not an annotation file, or a damaged one"


def damaged_hint(option: str) -> str:
    """The ``HINT`` of a file that cannot be parsed: how to get a good copy of it."""
    return (
        "HINT: the file is probably damaged or incomplete (an interrupted download, copy or extraction): download or "
        f"extract it again from the dataset's release (compare its size with the original's), or point `{option}` at "
        "a good copy."
    )


def expect_type(value: Any, types: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` when it is an instance of ``types``, else a :class:`DataFormatError` saying where."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataFormatError(f"{where}: {what} must be a JSON {_json_name(names)}, got {type(value).__name__}.")
    return value


def check_entry(entry: Any, keys: Iterable[str], where: str) -> dict[str, Any]:
    """``entry`` when it is a JSON object holding every key in ``keys``.

    Args:
        entry: one parsed annotation entry.
        keys: the keys it must have.
        where: where it is, e.g. ``"/data/coco_karpathy_train.json, entry 3"``.

    Raises:
        DataFormatError: not an object, or a key is missing; the message names the file, the entry and the key.
    """
    expect_type(entry, dict, where, "the entry")
    for key in keys:
        if key not in entry:
            raise DataFormatError(f"{where}: missing key {key!r} (the entry has keys {sorted(entry)}).")
    return entry


def field_strings(entries: Any, key: str, where: str, what: str) -> list[str]:
    """``[entry[key] for entry in entries]`` of a list of objects whose ``key`` is a string, checked.

    The common case runs as one comprehension; any malformed entry is then located for the error message.
    """
    expect_type(entries, list, where, what)
    try:
        values = [entry[key] for entry in entries]
        if all(type(v) is str for v in values):
            return values
    except (KeyError, TypeError):
        pass
    for index, entry in enumerate(entries):
        check_entry(entry, (key,), f"{where}, {what}[{index}]")
        expect_type(entry[key], str, f"{where}, {what}[{index}]", repr(key))
    raise AssertionError("unreachable: a malformed entry was not found")


def get_list(document: Any, key: str, path: Path, option: str) -> list[Any]:
    """``document[key]`` of a top-level JSON object, checked to be a list."""
    where = f"{path} (set by `{option}`)"
    top_level(document, dict, path, option)
    if key not in document:
        raise DataFormatError(
            f"{where}: missing top-level key {key!r} (the file has keys {sorted(document)}). {wrong_file_hint(option)}"
        )
    return expect_type(document[key], list, where, f"top-level key {key!r}")


def top_level(document: Any, types: type, path: Path, option: str) -> Any:
    """``document`` when the file's top level is a ``types`` (``dict``: an object, ``list``: an array), else a
    :class:`DataFormatError` naming the file, what its top level is, and a ``HINT``."""
    if not isinstance(document, types):
        expected, found = _json_name(types.__name__), _json_name(type(document).__name__)
        raise DataFormatError(
            f"{path} (set by `{option}`): the top level must be a JSON {expected}, got a JSON {found}. "
            + wrong_file_hint(option)
        )
    return document


def wrong_file_hint(option: str) -> str:
    """The ``HINT`` of a file whose JSON has another shape than the layout expects: most often another file."""
    return (
        f"HINT: check that `{option}` names the right file of the official layout (docs/data_formats.md); a file "
        "edited or converted by a script may have lost its structure."
    )


def text_list(value: Any, where: str, key: str) -> list[str]:
    """A caption field that is one string or a list of strings, as a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataFormatError(f"{where}: {key!r} must be a string or a list of strings, got {value!r:.80}.")


def image_id_from_name(name: str) -> int | str:
    """The id an image file name carries: trailing digits of its stem as an int, else the stem.

    ``COCO_val2014_000000391895.jpg`` → 391895, ``000000391895.jpg`` → 391895, ``1000092795.jpg`` → 1000092795.
    """
    stem = Path(name).stem
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else stem


def load_image(path: str, source: str, hint: str = "") -> Image.Image:
    """Open the image at ``path`` as RGB.

    Args:
        path: the image file.
        source: the annotation it belongs to, named in errors (e.g. ``"question_id 5 in /data/q.json"``).
        hint: what sets the image folder, appended to errors.

    Raises:
        DataFileNotFoundError: no file at ``path``.
        DataFormatError: the file is not a readable image (corrupt, truncated, not an image, or more pixels than PIL
            opens).
    """
    suffix = f" HINT: {hint}" if hint else ""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except FileNotFoundError as err:
        raise DataFileNotFoundError(f"Image not found: {path} (for {source}).{suffix}") from err
    except Image.DecompressionBombError as err:  # not an OSError: it ended in a traceback that named no file
        raise DataFormatError(
            f"Image {path} (for {source}) is too large to open: {err} HINT: PIL refuses images of more than twice "
            "PIL.Image.MAX_IMAGE_PIXELS pixels, as a guard against decompression bombs; resize the image, or leave its "
            "entry out of the annotations."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataFormatError(f"Image {path} (for {source}) cannot be read: {err}.{suffix}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, a 16-bit grayscale one scaled to 8 bits.

    PIL's ``convert("RGB")`` clips the values of a 16-bit image to 255 instead of scaling them, so a 16-bit PNG
    came out almost white; its top 8 bits are kept instead, as for the 8-bit version of the same picture.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _json_name(python_names: str) -> str:
    return (
        python_names.replace("dict", "object")
        .replace("list", "array")
        .replace("str", "string")
        .replace("NoneType", "null")
        .replace("int", "number")
        .replace("float", "number")
        .replace("bool", "boolean")
    )
