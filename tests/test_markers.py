"""Every pytest marker declared in ``pyproject.toml`` marks at least one test (``--strict-markers`` already refuses
an undeclared one), so ``-m gpu`` or ``-m distributed`` never selects nothing by accident."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_declared_marker_is_used() -> None:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = {line.split(":")[0].strip() for line in settings["tool"]["pytest"]["ini_options"]["markers"]}
    used = {
        name
        for path in (ROOT / "tests").rglob("test_*.py")
        for name in re.findall(r"pytest\.mark\.(\w+)", path.read_text(encoding="utf-8"))
    }
    assert declared == {"gpu", "distributed"}
    assert declared <= used
