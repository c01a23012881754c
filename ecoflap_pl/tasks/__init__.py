"""Task LightningModules: each wraps a Hugging Face or timm model, its collator, calibration loss and metrics.

The model families they serve are adapters in :mod:`ecoflap_pl.tasks.families`.
"""

from ecoflap_pl.tasks.base import EcoflapTask
from ecoflap_pl.tasks.captioning import CaptioningTask
from ecoflap_pl.tasks.classification import ClassificationTask
from ecoflap_pl.tasks.language_modeling import LanguageModelingTask
from ecoflap_pl.tasks.nlvr2 import NLVR2Task
from ecoflap_pl.tasks.retrieval import RetrievalTask
from ecoflap_pl.tasks.vqa import VQATask
from ecoflap_pl.tasks.zero_shot import ZeroShotClassificationTask

__all__ = [
    "CaptioningTask",
    "ClassificationTask",
    "EcoflapTask",
    "LanguageModelingTask",
    "NLVR2Task",
    "RetrievalTask",
    "VQATask",
    "ZeroShotClassificationTask",
]
