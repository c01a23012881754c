"""The ordinary DataModules, pointed at the demo datasets (built on first use, then reused from the cache).

Each class only chooses ``data_dir``: ``DemoVQAv2DataModule`` *is* a :class:`~ecoflap_pl.datamodules.VQAv2DataModule`
reading the official VQAv2 files that :func:`~ecoflap_pl.demo.data.build_demo_data` wrote, so a demo run goes through
exactly the code a run on the real dataset does. Every other argument is the parent's.
"""

from __future__ import annotations

import os
from typing import Any

from ecoflap_pl.datamodules import COCOCaptionDataModule, ImageNetDataModule, VQAv2DataModule
from ecoflap_pl.demo.cache import demo_dir
from ecoflap_pl.demo.data import DemoPaths
from ecoflap_pl.demo.presets import get_preset
from ecoflap_pl.demo.progress import stage_bars


def demo_data(preset: str = "default", cache_dir: str | os.PathLike[str] | None = None) -> DemoPaths:
    """The demo datasets of ``preset`` under the demo cache (:func:`~ecoflap_pl.demo.cache.demo_dir`), built with
    progress bars the first time."""
    chosen = get_preset(preset)
    root = chosen.data_dir(demo_dir(cache_dir))
    with stage_bars(f"Building the demo data ({preset})") as progress:
        return chosen.data.build(root, progress=progress)


class DemoVQAv2DataModule(VQAv2DataModule):
    """:class:`~ecoflap_pl.datamodules.VQAv2DataModule` on the demo's VQAv2 files (val split: 2014 val scenes).

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.datamodules.VQAv2DataModule` argument but ``data_dir``.
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir=demo_data(preset, cache_dir).vqav2, **kwargs)


class DemoCOCOCaptionDataModule(COCOCaptionDataModule):
    """:class:`~ecoflap_pl.datamodules.COCOCaptionDataModule` on the demo's COCO captions (Karpathy splits).

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.datamodules.COCOCaptionDataModule` argument but ``data_dir``.
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir=demo_data(preset, cache_dir).coco, **kwargs)


class DemoImageNetDataModule(ImageNetDataModule):
    """:class:`~ecoflap_pl.datamodules.ImageNetDataModule` on the demo's ImageNet-layout digits (10 classes).

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.datamodules.ImageNetDataModule` argument but ``data_dir``
            (``class_names_file`` defaults to the demo's ``class_names.json``).
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("class_names_file", "class_names.json")
        super().__init__(data_dir=demo_data(preset, cache_dir).imagenet, **kwargs)
