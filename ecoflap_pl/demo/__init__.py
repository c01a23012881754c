"""The embedded demo: small real-digit datasets in the official layouts and small models trained on them, so
``ecoflap`` can show the whole pipeline on a laptop without a GPU or the model hub (see the README's quick start).

- :mod:`~ecoflap_pl.demo.data`: the datasets (COCO captions, VQAv2, NLVR2, ImageNet layouts).
- :mod:`~ecoflap_pl.demo.blip2`, :mod:`~ecoflap_pl.demo.vit`: the demo BLIP-2 and timm ViT, trained on first use.
- :mod:`~ecoflap_pl.demo.datamodules`, :mod:`~ecoflap_pl.demo.tasks`: the ordinary DataModules and tasks pointed at
  them, for the configs in ``configs/demo/``.
- :mod:`~ecoflap_pl.demo.cache`, :mod:`~ecoflap_pl.demo.presets`: where everything is cached, and at what size.
"""

from ecoflap_pl.demo.cache import demo_dir
from ecoflap_pl.demo.data import (
    ANSWER_VOCABULARY,
    CLASS_NAMES,
    COLOURS,
    WNIDS,
    DemoPaths,
    Digit,
    Scene,
    build_demo_data,
)
from ecoflap_pl.demo.presets import PRESETS, Blip2Recipe, DemoDataSize, DemoPreset, VitRecipe, get_preset

__all__ = [
    "ANSWER_VOCABULARY",
    "CLASS_NAMES",
    "COLOURS",
    "PRESETS",
    "WNIDS",
    "Blip2Recipe",
    "DemoDataSize",
    "DemoPaths",
    "DemoPreset",
    "Digit",
    "Scene",
    "VitRecipe",
    "build_demo_data",
    "demo_dir",
    "get_preset",
]
