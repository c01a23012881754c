"""``benchmarks/sparse_readers.py`` at its own (tiny) scale: the folders it writes read back equal through
``load_pruned_model``, and a reader that loses the pruned weights is reported as such, not as equal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def sparse_readers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import sparse_readers

    return sparse_readers


def test_every_folder_reads_back_equal_and_a_lost_weight_is_named(
    sparse_readers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(1)
    sparse_readers.write(tmp_path)
    cases = sorted(path.name for path in tmp_path.iterdir() if path.is_dir())
    assert cases == [
        "blip2_opt-sparse-24-bitmask",
        "blip2_opt-sparse-bitmask",
        "llama-sparse-24-bitmask",
        "llama-sparse-bitmask",
    ]
    with caplog.at_level(logging.INFO, logger="sparse_readers"):
        sparse_readers.read(tmp_path, "load_pruned_model")
    assert [line for line in caplog.messages if ": equal" in line] == [f"  {case}: equal" for case in cases]

    reference = tmp_path / "llama-sparse-bitmask.reference.safetensors"
    tensors = load_file(str(reference))
    pruned = next(name for name in tensors if name.endswith("down_proj.weight"))
    save_file({**tensors, pruned: tensors[pruned] + 1.0}, str(reference))  # as if the reader lost that weight
    assert sparse_readers._verdict("load_pruned_model", tmp_path / "llama-sparse-bitmask").startswith("random (1 of")
