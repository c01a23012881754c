"""Writing the demo's files, and the progress callback the writers report to."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, called after each image is written."""


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
