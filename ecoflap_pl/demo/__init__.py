"""The embedded demo: small real-digit datasets in the official layouts, so the demo runs the real pipeline."""

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

__all__ = ["ANSWER_VOCABULARY", "CLASS_NAMES", "COLOURS", "WNIDS", "DemoPaths", "Digit", "Scene", "build_demo_data"]
