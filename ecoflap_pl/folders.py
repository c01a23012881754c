"""The first subfolders of a folder, for the hints that point at the right one (a dataset's root, a model folder)."""

from __future__ import annotations

import itertools
from pathlib import Path


def first_subfolders(folder: Path, limit: int) -> list[Path]:
    """The first ``limit`` folders inside ``folder``, by name; hidden ones (``.git``, ``.cache``) are left out.

    A hint looks inside these only: a data folder may hold thousands of image folders.

    Raises:
        OSError: ``folder`` cannot be listed.
    """
    names = sorted(path for path in folder.iterdir() if path.name[:1] != ".")
    return list(itertools.islice((path for path in names if path.is_dir()), limit))
