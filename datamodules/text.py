"""Plain text for language-model pruning (FlanT5, LLaMA): WikiText raw files or C4-style JSON lines.

The layouts read (docs/data_formats.md, Text corpora) are the ones the Wanda/SparseGPT evaluations use:
WikiText-2 raw (``wiki.train.raw``: one paragraph per line, blank lines between) and C4 shards
(``c4-train.00000-of-01024.json.gz``: one JSON object per line with a ``"text"`` field, gzip or not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from typing_extensions import override

from ecoflap_pl.datamodules._io import (
    DataFormatError,
    check_entry,
    damaged_hint,
    expect_type,
    not_utf8,
    read_json_lines,
)
from ecoflap_pl.datamodules.base import EcoflapDataModule, Stage

JSON_LINES_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def read_texts(path: Path, option: str, text_key: str) -> list[str]:
    """The documents of a JSON-lines file (its ``text_key`` field) or of a plain text file (its non-empty lines)."""
    if path.name.endswith(JSON_LINES_SUFFIXES):
        texts = []
        for number, entry in read_json_lines(path, option):
            where = f"{path}, line {number}"
            check_entry(entry, (text_key,), where)
            texts.append(expect_type(entry[text_key], str, where, repr(text_key)))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path} (set by `{option}`) {not_utf8(err)}. {damaged_hint(option)}") from err
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataFormatError(f"{path} (set by `{option}`) holds no text. HINT: point `{option}` at a non-empty file.")
    return texts


class TextDataset(Dataset[dict[str, Any]]):
    """``{"text": str, "text_id": int}`` samples, one per document; ``text_id`` is the document's index in its file
    (its order among the file's documents), so evaluation counts a document that DDP's sampler repeats once."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "text_id": index}


class TextDataModule(EcoflapDataModule):
    """Documents of a text corpus for language modelling and its calibration (C4 for the official LLaMA runs).

    Samples: ``{"text": str, "text_id": int}`` (the document's index in its file). The task's collator tokenises and
    truncates.

    Args:
        data_dir: dataset root.
        train_file: training documents (calibration reads them), e.g. ``c4-train.00000-of-01024.json.gz`` or
            ``wikitext-2-raw/wiki.train.raw``; absolute or relative to ``data_dir``.
        val_file: documents of the validation loop (perplexity).
        test_file: documents of the test loop.
        text_key: the field holding the text in JSON-lines files.
        **kwargs: batch_size, num_workers, collate_fn, calibration_* and shuffle_seed
            (see :class:`~ecoflap_pl.datamodules.base.EcoflapDataModule`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        text_key: str = "text",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self.files: dict[Stage, str | None] = {"train": train_file, "val": val_file, "test": test_file}
        self.text_key = text_key

    @override
    def _locate(self, stage: Stage) -> dict[str, Path]:
        path, option = self._required_file(stage, self.files[stage], "text")
        return {option: path}

    @override
    def _read(self, stage: Stage, files: dict[str, Path]) -> Dataset[dict[str, Any]]:
        option = f"{stage}_file"
        return TextDataset(read_texts(files[option], option, self.text_key))
