"""The export tests reuse the engine tests' tiny model families (tests/pruning/pruning_helpers.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pruning"))
