"""Evaluation metrics of the ecoflap-pl tasks: torchmetrics ``Metric``s that gather correctly across DDP ranks.

- :class:`CaptionScores`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE optional) through pycocoevalcap's scorers.
- :class:`VQAAccuracy`: the official VQA accuracy (normalisation + 10-answer rule), overall and per answer type;
  :func:`write_vqa_results` writes the official test-server file.
- :class:`RetrievalRecall`: text->image and image->text Recall@1/5/10 over the whole split;
  :func:`retrieval_recall` computes it from a precomputed similarity matrix.
- :class:`TopKAccuracy`: the share of samples whose label is among the top K logits (ImageNet top-1 / top-5 and
  NLVR2 accuracy); :func:`top_k_accuracy` is its functional form.
- :class:`MeanLoss`: the mean of per-sample losses (the logged ``val/loss`` of classification and NLVR2);
  :func:`mean_loss` is its functional form.
- :class:`TokenPerplexity`: perplexity over every target token (the logged ``val/perplexity`` of language
  modelling); :func:`token_perplexity` is its functional form.

Each metric takes an id per sample (``image_id``, ``question_id``, NLVR2's ``identifier``, a text's ``text_id``) and
counts a repeated id once, so the samples a padding ``DistributedSampler`` repeats under DDP drop out and every number
equals a one-device run, the mean loss and perplexity included. Top-K accuracy is torchmetrics'
``MulticlassAccuracy(top_k=k, average="micro")`` per sample, perplexity its ``Perplexity`` per sample: torchmetrics'
own classes keep only sums, which cannot drop a repeated sample.

Usage in a LightningModule: call ``metric.update(...)`` in ``validation_step`` (never ``metric(...)``: the
caption scores start JVMs, scoring every batch would be slow), then in ``on_validation_epoch_end``
``self.log_dict({f"val/{k}": v for k, v in metric.compute().items()})`` and ``metric.reset()``. ``compute()``
returns a ``dict[str, float]`` that is identical on every rank; :class:`TopKAccuracy`, :class:`MeanLoss` and
:class:`TokenPerplexity` return a 0-dim tensor, so ``self.log("val/top1", metric)`` in the step logs it and Lightning
computes and resets it at the end of the epoch.
All scores are fractions (VQA accuracy 0.65, not 65; CIDEr 1.2, not 120).
"""

from ecoflap_pl.metrics.accuracy import TopKAccuracy, top_k_accuracy
from ecoflap_pl.metrics.caption import CAPTION_SCORE_KEYS, CaptionScores, caption_scores
from ecoflap_pl.metrics.loss import MeanLoss, mean_loss
from ecoflap_pl.metrics.perplexity import TokenPerplexity, token_perplexity
from ecoflap_pl.metrics.retrieval import RetrievalRecall, retrieval_recall
from ecoflap_pl.metrics.vqa import ANSWER_TYPES, VQAAccuracy, vqa_accuracy, vqa_score, write_vqa_results
from ecoflap_pl.metrics.vqa_normalization import normalize_answer

__all__ = [
    "ANSWER_TYPES",
    "CAPTION_SCORE_KEYS",
    "CaptionScores",
    "MeanLoss",
    "RetrievalRecall",
    "TokenPerplexity",
    "TopKAccuracy",
    "VQAAccuracy",
    "caption_scores",
    "mean_loss",
    "normalize_answer",
    "retrieval_recall",
    "token_perplexity",
    "top_k_accuracy",
    "vqa_accuracy",
    "vqa_score",
    "write_vqa_results",
]
