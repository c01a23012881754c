"""Damaged annotation files (cut short, a syntax error, bytes that are not UTF-8, empty, JSON of another shape) of
every DataModule family: reading the split names the file, what is wrong (with the line and column of a JSON error)
and a ``HINT``."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ecoflap_pl.datamodules import (
    DataFormatError,
    EcoflapDataModule,
    NLVR2DataModule,
    TextDataModule,
    VQAv2DataModule,
)
from tests.datamodules.test_check_files import CASES, datamodule_case

DAMAGED = r"HINT: the file is probably damaged or incomplete .*: download or extract it again"


def _fresh(datamodule: EcoflapDataModule) -> EcoflapDataModule:
    """The same DataModule, built again: nothing it read before (ImageNet's class names) is cached."""
    return type(datamodule)(**dict(datamodule.hparams), collate_fn=datamodule.collate_fn)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut_short":  # an interrupted download or copy: the end is missing, from inside the last line
        path.write_bytes(data.rstrip(b"\n")[:-5])
    elif how == "syntax":  # a quote changed (JSON), a separator changed (CSV)
        path.write_bytes(data.replace(b'"', b"'", 1) if b'"' in data else data.replace(b",", b";", 1))
    else:  # bytes that are not UTF-8 in the middle
        path.write_bytes(data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2 :])


@pytest.mark.parametrize("how", ["cut_short", "syntax", "not_utf8"])
@pytest.mark.parametrize("name", CASES)
def test_a_damaged_file_is_named_with_what_is_wrong_and_a_hint(
    name: str, how: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    datamodule, stage, expected = datamodule_case(name, tmp_path, request)
    files = [option for option in expected if not option.endswith("_dir")]  # ImageNet's image folders are not files
    for option in files:
        path = datamodule.check_files(stage)[option]
        original = path.read_bytes()
        _damage(path, how)
        with pytest.raises(DataFormatError) as raised:
            _fresh(datamodule).dataset(stage)
        message = str(raised.value)
        assert str(path) in message and f"`{option}`" in message and re.search(DAMAGED, message), message
        if how == "not_utf8":
            assert "is not UTF-8 text (invalid start byte at byte " in message, message
        elif path.suffix == ".csv":
            assert ("it may be cut short" in message) == (how == "cut_short"), message
        elif how == "cut_short":  # JSON, and the JSON-lines files of NLVR2 and C4
            cut = r"the file ends before its JSON is complete \(.* at (line \d+, )?column \d+\): it is cut short"
            assert re.search(cut, message), message
        else:
            assert re.search(r"is not valid JSON: .* at (line \d+, )?column \d+[.;] ", message), message
        path.write_bytes(original)
    assert len(_fresh(datamodule).dataset(stage)) > 0  # every file restored: the split reads again


def test_an_empty_json_file_says_it_is_empty(vqa_root: Path) -> None:
    path = vqa_root / "v2_mscoco_val2014_annotations.json"
    path.write_bytes(b"\n")
    expected = r"\(set by `val_annotations_file`\) is not valid JSON: the file is empty\. HINT"
    with pytest.raises(DataFormatError, match=expected):
        VQAv2DataModule(vqa_root).dataset("val")


def _as_list(document: Any) -> Any:
    return [document]


def _in_object(document: Any) -> Any:
    return {"entries": document}


SHAPES: list[tuple[str, str, Callable[[Any], Any], str]] = [
    # case, option, how the parsed file is changed, what the error says
    ("vqa_val", "val_questions_file", _as_list, r"the top level must be a JSON object, got a JSON array\. HINT: check "
     r"that `val_questions_file` names the right file"),
    ("vqa_val", "val_annotations_file", lambda d: {**d, "annotations": {}},
     r"top-level key 'annotations' must be a JSON array, got dict"),
    ("coco_karpathy", "test_file", _in_object, r"is not a COCO caption file in a known format: expected a list of "
     r"\{'image', 'caption'\}.*HINT: check that `test_file`"),
    ("coco_official", "test_file", _as_list, r"captions_val2014\.json, entry 0: missing key 'image'"),  # a list: LAVIS
    ("coco_original", "train_file", lambda d: {"images": {}}, r"top-level key 'images' must be a JSON array"),
    ("flickr30k", "val_file", lambda d: "flickr30k", r"is not a Flickr30k caption file in a known format"),
    ("image_text_pairs", "train_file", _in_object, r"the top level must be a JSON array, got a JSON object\. HINT: "
     r"check that `train_file`"),
    ("imagenet_flat_val", "class_names_file", lambda d: "tench", r"the top level must be a JSON array, got a JSON "
     r"string\. HINT: check that `class_names_file`"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "option", "change", "message"), SHAPES, ids=[f"{c[0]}-{c[1]}" for c in SHAPES])
def test_json_of_another_shape_is_named(
    name: str, option: str, change: Callable[[Any], Any], message: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    datamodule, stage, _ = datamodule_case(name, tmp_path, request)
    path = datamodule.check_files(stage)[option]
    path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
    with pytest.raises(DataFormatError, match=message) as raised:
        datamodule.dataset(stage)
    assert str(path) in str(raised.value)


def test_json_lines_of_another_shape_name_the_line(nlvr2_root: Path) -> None:
    path = nlvr2_root / "dev.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(json.dumps([json.loads(line) for line in lines], indent=1), encoding="utf-8")  # one JSON array
    expected = (
        r"dev\.json \(set by `val_file`\), line 1 is not valid JSON: the line ends before its JSON is complete .*; "
        r"the file must hold one JSON object per line\. HINT"
    )
    with pytest.raises(DataFormatError, match=expected):
        NLVR2DataModule(nlvr2_root).dataset("val")
    path.write_text("\n".join(json.dumps([json.loads(line)]) for line in lines), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"dev\.json, line 1: the entry must be a JSON object, got list"):
        NLVR2DataModule(nlvr2_root).dataset("val")


def test_an_empty_json_lines_file_names_the_file(nlvr2_root: Path) -> None:
    (nlvr2_root / "dev.json").write_text("", encoding="utf-8")
    expected = rf"the val loop has no samples \(read from `val_file` {re.escape(str(nlvr2_root / 'dev.json'))}, .*HINT"
    with pytest.raises(DataFormatError, match=expected):
        NLVR2DataModule(nlvr2_root).dataset("val")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda data: data[: len(data) // 2], "Compressed file ended before the end-of-stream marker was reached"),
        (lambda data: b"not gzip" + data, "Not a gzipped file"),
    ],
    ids=["cut_short", "not_gzip"],
)
def test_a_damaged_gzip_shard_is_named(tmp_path: Path, content: Callable[[bytes], bytes], problem: str) -> None:
    # C4 shards are gzip JSON lines: a cut or foreign file used to raise gzip's EOFError/OSError without the path.
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    data = gzip.compress("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(50)).encode())
    shard.write_bytes(content(data))
    expected = rf"{re.escape(str(shard))} \(set by `train_file`\) cannot be read: {problem}.*{DAMAGED}"
    with pytest.raises(DataFormatError, match=expected):
        TextDataModule(tmp_path, train_file=shard.name).dataset("train")
