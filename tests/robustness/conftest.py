"""The robustness cases reuse the engine's toy models and data (``tests/pruning/pruning_helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

# The test folders are not packages; the toy models of the engine tests are shared by putting their folder on the
# path (pytest does the same for the folder of every collected test module).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pruning"))
