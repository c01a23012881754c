"""The demo's build bars: one bar per stage reported, nothing at all for a build the cache skips."""

from __future__ import annotations

import pytest

from ecoflap_pl.demo.progress import stage_bars


def test_a_build_that_reports_no_stage_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with stage_bars("Building the demo data (tiny)"):
        pass  # a cached build: no stage reported
    assert capsys.readouterr().out == ""


def test_each_reported_stage_gets_a_bar_with_its_total(capsys: pytest.CaptureFixture[str]) -> None:
    with stage_bars("Building the demo data (tiny)") as progress:
        for done in range(1, 5):
            progress("scenes train2014", done, 4)
        progress("imagenet val", 2, 2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "scenes train2014" in lines[0] and "4/4" in lines[0]
    assert "imagenet val" in lines[1] and "2/2" in lines[1]
