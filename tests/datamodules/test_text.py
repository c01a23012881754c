"""TextDataModule: WikiText raw files, C4-style JSON lines (gzip or not), document ids, calibration subset, errors."""

from __future__ import annotations

import gzip
import json

import pytest

from ecoflap_pl.datamodules import DataFileNotFoundError, DataFormatError
from ecoflap_pl.datamodules.text import TextDataModule


def _identity(samples):
    return samples


def test_reads_wikitext_raw_and_c4_json_lines(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(" \n = Title = \n\n first paragraph \n\n second \n", encoding="utf-8")
    with gzip.open(tmp_path / "c4.json.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "doc two"}) + "\n")
    data = TextDataModule(tmp_path, train_file="wiki.train.raw", val_file="c4.json.gz", collate_fn=_identity)
    assert [s["text"] for s in data.dataset("train")] == ["= Title =", "first paragraph", "second"]
    assert [s["text"] for s in data.dataset("val")] == ["doc one", "doc two"]
    # each document's index in its file: the id that evaluation counts once under DDP
    assert [s["text_id"] for s in data.dataset("train")] == [0, 1, 2]
    assert [s["text_id"] for s in data.dataset("val")] == [0, 1]
    calibration = [s for batch in data.calibration_dataloader(2) for s in batch]
    assert len(calibration) == 2 and all(s in list(data.dataset("train")) for s in calibration)


def test_missing_file_names_path_and_option(tmp_path):
    data = TextDataModule(tmp_path, train_file="missing.jsonl")
    with pytest.raises(DataFileNotFoundError, match="train_file"):
        data.dataset("train")


def test_missing_text_key_names_line(tmp_path):
    (tmp_path / "c4.jsonl").write_text(json.dumps({"content": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 1"):
        TextDataModule(tmp_path, train_file="c4.jsonl").dataset("train")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="holds no text"):
        TextDataModule(tmp_path, train_file="empty.txt").dataset("train")


def test_unset_split_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"`val_file` must be set for the val loop of TextDataModule, got None\. HINT"):
        TextDataModule(tmp_path, train_file="x.txt").dataset("val")
