"""Where the demo keeps its data and trained models, and how a cached build is reused or redone.

Everything the demo makes lives under one directory, :func:`demo_dir`: ``$ECOFLAP_DEMO_DIR`` when set, else
``~/.cache/ecoflap-pl/demo``::

    data/<preset>/           the demo datasets (:func:`~ecoflap_pl.demo.data.build_demo_data`)
    models/blip2-<preset>/   the trained demo BLIP-2: save_pretrained model + processor
    models/vit-<preset>/     the trained demo timm ViT: model.safetensors

Each build directory holds a marker file with the parameters it was built from. A later run whose parameters match
reuses it at once; different parameters (another preset, a newer recipe) rebuild it. A build is written to a
temporary sibling directory and renamed into place when complete, so an interrupted run never leaves a half-written
model behind, and two processes building the same thing at once both end with one complete copy. Its files get the
modes of the umask, as files written with a plain ``open()`` do (:func:`~ecoflap_pl.export.file_modes.umask_modes`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ecoflap_pl.export.file_modes import umask_modes

log = logging.getLogger(__name__)

ENV_DIR = "ECOFLAP_DEMO_DIR"
"""Environment variable naming the demo cache directory."""
DEFAULT_DIR = "~/.cache/ecoflap-pl/demo"
"""The demo cache directory when neither an argument nor ``$ECOFLAP_DEMO_DIR`` names one."""
MARKER = "ecoflap_demo_build.json"


def demo_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The demo cache directory: ``cache_dir``, else ``$ECOFLAP_DEMO_DIR``, else ``~/.cache/ecoflap-pl/demo``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(ENV_DIR) or DEFAULT_DIR
    return Path(chosen).expanduser()


def read_marker(directory: Path, marker: str = MARKER) -> dict[str, Any] | None:
    """The parameters ``directory`` was built from (its ``marker`` file), or None when it holds no complete build."""
    try:
        return json.loads((directory / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_build(
    target: Path,
    params: dict[str, Any],
    build: Callable[[Path], None],
    *,
    marker: str = MARKER,
    rebuild: bool = False,
) -> Path:
    """Reuse ``target`` when it was built from ``params``; else run ``build(tmp_dir)`` and move it into place.

    Args:
        target: the build directory.
        params: JSON-serialisable parameters of the build, stored as its marker.
        build: writes the build into the (empty, existing) directory it is given.
        marker: the marker file's name inside the build directory.
        rebuild: build and replace ``target`` even when it was built from ``params``.

    Returns:
        ``target``.
    """
    params = json.loads(json.dumps(params))  # the form the marker reads back (tuples become lists)
    if not rebuild and read_marker(target, marker) == params:
        log.debug("Reusing %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        with umask_modes(tmp):
            build(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=2), encoding="utf-8")
        _move_into_place(tmp, target, params, marker, keep_same=not rebuild)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(new: Path, target: Path, params: dict[str, Any], marker: str, keep_same: bool) -> None:
    """Rename ``new`` to ``target``, moving an older ``target`` out of the way first.

    Builds are deterministic, so with ``keep_same``, when a concurrent run (another DDP rank) has already put the same
    build in place, its copy is kept and ``new`` is dropped.
    """
    if keep_same and read_marker(target, marker) == params:
        return
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        new.rename(target)
    except OSError:
        if read_marker(target, marker) != params:
            raise
