"""Caption scores are slow to compute (the PTB tokenizer and METEOR are JVMs): compute them once per session."""

from __future__ import annotations

import pytest

from ecoflap_pl.metrics import CaptionScores
from tests.metrics.metric_data import CAPTION_IDS, CAPTION_PREDICTIONS, CAPTION_REFERENCES


@pytest.fixture(scope="session")
def caption_scores_single() -> dict[str, float]:
    """CaptionScores over the tiny caption data in one process: two batches plus a repeated (padding) sample."""
    metric = CaptionScores()
    metric.update(CAPTION_PREDICTIONS[:4], CAPTION_REFERENCES[:4], ids=CAPTION_IDS[:4])
    metric.update(CAPTION_PREDICTIONS[4:], CAPTION_REFERENCES[4:], ids=CAPTION_IDS[4:])
    metric.update(CAPTION_PREDICTIONS[:1], CAPTION_REFERENCES[:1], ids=CAPTION_IDS[:1])
    return metric.compute()
