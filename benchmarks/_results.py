"""Writing one benchmark's section of ``benchmarks/RESULTS.md`` without touching the others."""

from __future__ import annotations

import os
import re


def write_section(path: str, heading: str, section: str) -> None:
    """Replace the section of ``path`` that starts with ``heading`` (or append it), leaving every other one alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as handle:
        handle.write(text.rstrip("\n") + "\n")
