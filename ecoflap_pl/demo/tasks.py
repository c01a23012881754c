"""The ordinary tasks, on the demo's trained models (trained on first use, then reused from the cache).

Each class only chooses the model: ``DemoVQATask`` *is* a :class:`~ecoflap_pl.tasks.VQATask` whose ``pretrained``
is the ``save_pretrained`` directory of the demo BLIP-2 (:func:`~ecoflap_pl.demo.blip2.demo_blip2`), so a demo run
loads, prunes and evaluates it exactly as it would ``Salesforce/blip2-opt-2.7b``. Every other argument is the
parent's.
"""

from __future__ import annotations

from typing import Any

from ecoflap_pl.demo.blip2 import demo_blip2
from ecoflap_pl.demo.presets import get_preset
from ecoflap_pl.demo.vit import TIMM_ARCHITECTURE, demo_vit, vit_model_config
from ecoflap_pl.tasks import CaptioningTask, ClassificationTask, VQATask


class DemoVQATask(VQATask):
    """:class:`~ecoflap_pl.tasks.VQATask` on the demo BLIP-2.

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.tasks.VQATask` argument but ``pretrained``.
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(pretrained=str(demo_blip2(preset, cache_dir)), **kwargs)


class DemoCaptioningTask(CaptioningTask):
    """:class:`~ecoflap_pl.tasks.CaptioningTask` on the demo BLIP-2.

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.tasks.CaptioningTask` argument but ``pretrained``.
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(pretrained=str(demo_blip2(preset, cache_dir)), **kwargs)


class DemoClassificationTask(ClassificationTask):
    """:class:`~ecoflap_pl.tasks.ClassificationTask` on the demo timm ViT (10 digit classes).

    Args:
        preset: demo size (:data:`~ecoflap_pl.demo.presets.PRESETS`).
        cache_dir: demo cache directory; default ``$ECOFLAP_DEMO_DIR`` or ``~/.cache/ecoflap-pl/demo``.
        **kwargs: every other :class:`~ecoflap_pl.tasks.ClassificationTask` argument but ``timm_model``,
            ``pretrained`` and ``model_config``.
    """

    def __init__(self, preset: str = "default", cache_dir: str | None = None, **kwargs: Any) -> None:
        weights = demo_vit(preset, cache_dir)
        super().__init__(
            timm_model=TIMM_ARCHITECTURE,
            pretrained=True,
            model_config=vit_model_config(get_preset(preset).vit, weights),
            **kwargs,
        )
