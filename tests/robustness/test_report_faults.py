"""Writing the pruning report where it cannot be written: the error names the folder and the fix (see ``CASES.md``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ecoflap_pl.pruning import PruningConfig, prune
from ecoflap_pl.reporting import REPORT_JSON, write_report
from tests.pruning.pruning_helpers import seeded_toy_model, toy_batches, toy_loss


@pytest.fixture(scope="module")
def result():
    config = PruningConfig(importance="uniform", coarse_samples=8, fine_samples=8)
    return prune(seeded_toy_model(), toy_batches(2), toy_loss, config)


def test_a_full_disk_names_the_report_folder(result, tmp_path, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", no_space)  # only the write itself fails, as on a full disk
    with pytest.raises(OSError, match=rf"could not be written to {tmp_path}: No space left on device\. HINT"):
        write_report(result, tmp_path)
    assert not (tmp_path / REPORT_JSON).exists()


def test_a_file_in_place_of_the_report_folder(result, tmp_path):
    blocker = tmp_path / "report"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(OSError, match=r"could not be written to .*report: .*HINT: .*`pruning.report_dir`"):
        write_report(result, blocker)
    assert blocker.read_text(encoding="utf-8") == "not a folder"
