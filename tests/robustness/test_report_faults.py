"""Writing the pruning report where it cannot be written: the error names the folder and the fix (see ``CASES.md``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ecoflap_pl import reporting
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


def test_a_failure_after_the_json_leaves_the_previous_report_whole(result, tmp_path, monkeypatch):
    """The JSON was written in place first: a plot that then failed (a full disk) left the new JSON beside the old
    plot, a report of a run that had failed."""
    write_report(result, tmp_path, {"run": "previous"})
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reporting, "plot_sparsity", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(result, tmp_path, {"run": "new"})
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
