"""Evaluation metrics of the ecoflap-pl tasks: torchmetrics ``Metric``s that gather correctly across DDP ranks.

- :class:`CaptionScores`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE optional) through pycocoevalcap's scorers.
- :class:`VQAAccuracy`: the official VQA accuracy (normalisation + 10-answer rule), overall and per answer type;
  :func:`write_vqa_results` writes the official test-server file.
- :class:`RetrievalRecall`: text->image and image->text Recall@1/5/10 over the whole split;
  :func:`retrieval_recall` computes it from a precomputed similarity matrix.

NLVR2 accuracy and ImageNet top-1 / top-5 are not rewritten here: tasks use torchmetrics' own metrics,
``torchmetrics.classification.BinaryAccuracy()`` for NLVR2 (label 1 = "True") and
``MulticlassAccuracy(num_classes=1000, top_k=1, average="micro")`` / ``MulticlassAccuracy(..., top_k=5,
average="micro")`` for ImageNet (``average="micro"`` is the plain fraction of correct images; the default
``"macro"`` averages per class).

Usage in a LightningModule: call ``metric.update(...)`` in ``validation_step`` (never ``metric(...)``: the
caption scores start JVMs, scoring every batch would be slow), then in ``on_validation_epoch_end``
``self.log_dict({f"val/{k}": v for k, v in metric.compute().items()})`` and ``metric.reset()``. ``compute()``
returns a ``dict[str, float]`` that is identical on every rank. All values are fractions (VQA accuracy 0.65, not
65; CIDEr 1.2, not 120).
"""

from ecoflap_pl.metrics.caption import CAPTION_SCORE_KEYS, CaptionScores, caption_scores
from ecoflap_pl.metrics.retrieval import RetrievalRecall, retrieval_recall
from ecoflap_pl.metrics.vqa import ANSWER_TYPES, VQAAccuracy, vqa_accuracy, vqa_score, write_vqa_results
from ecoflap_pl.metrics.vqa_normalization import normalize_answer

__all__ = [
    "ANSWER_TYPES",
    "CAPTION_SCORE_KEYS",
    "CaptionScores",
    "RetrievalRecall",
    "VQAAccuracy",
    "caption_scores",
    "normalize_answer",
    "retrieval_recall",
    "vqa_accuracy",
    "vqa_score",
    "write_vqa_results",
]
