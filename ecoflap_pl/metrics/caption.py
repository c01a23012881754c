"""COCO caption scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where it can run) through pycocoevalcap.

The scorers are called directly, exactly as ``COCOEvalCap.evaluate()`` calls them (PTB-tokenise the references
and the predictions, then each scorer on the tokenised dicts), but without ``evaluate()`` itself: it sets SPICE up
first, and SPICE downloads Stanford CoreNLP models on first use, which cannot work offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from torch import Tensor

from ecoflap_pl.metrics._states import (
    ListStateMetric,
    cat_state,
    first_occurrences,
    sample_ids,
    text_state_dtypes,
)

log = logging.getLogger(__name__)

CAPTION_SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "Caption scores need a Java runtime on PATH (pycocoevalcap's PTB tokenizer and METEOR are Java), "
            "found none. HINT: install a JRE (e.g. `apt-get install default-jre-headless`)."
        )


def _missing_spice_models() -> list[Path]:
    from pycocoevalcap.spice import get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    jars = (lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar")
    return [jar for jar in jars if not jar.is_file()]


def _require_spice() -> None:
    missing = _missing_spice_models()
    if missing:
        raise RuntimeError(
            f"`spice=True` needs the Stanford CoreNLP jars SPICE runs on, missing: {[str(p) for p in missing]}. "
            "HINT: pycocoevalcap downloads them on first use, which needs network; on a machine with network run "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'` and "
            "copy the jars to that folder, or set spice=False."
        )


def _clean(text: str) -> str:
    # PTBTokenizer reads one caption per line (-preserveLines); pycocoevalcap only replaces "\n", so a "\r" or
    # "\u2028" inside a caption would shift every later caption onto the wrong image. Any line break -> a space.
    return " ".join(text.splitlines())


def _caption_update(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Validate one batch; returns cleaned predictions and references."""
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise TypeError(f"`predictions` must be a sequence of strings, got {predictions!r}.")
    if len(references) != len(predictions):
        raise ValueError(
            f"`references` must hold one list of reference captions per prediction ({len(predictions)}), "
            f"got {len(references)}."
        )
    cleaned_refs = []
    for refs in references:
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(
                f"`references` must hold a non-empty list of strings per sample, got {refs!r}. "
                "HINT: a single caption still goes in a list: [['a dog runs']]."
            )
        cleaned_refs.append([_clean(r) for r in refs])
    return [_clean(p) for p in predictions], cleaned_refs


# File descriptor 2 is the process's: two redirections that overlapped (threads scoring at once) would each put back
# what the other had put there, leaving standard error in a deleted temporary file for the rest of the process.
_STDERR_REDIRECT = threading.RLock()


@contextmanager
def _without_tokenizer_summary() -> Iterator[None]:
    """Drop the "PTBTokenizer tokenized N tokens at R tokens per second." line that Stanford's tokenizer prints on
    every call, keeping anything else it (or Python) writes to standard error meanwhile.

    pycocoevalcap starts the Java tokenizer with the parent's standard error and offers no option to quiet it, so the
    file descriptor itself is redirected to a temporary file for the call and what it received is written back to
    it, less that line. Where it cannot be redirected (no temporary file can be made, or the process has no standard
    error: ``pythonw``, a service) the call runs as it is, line included: quieting it is no reason to fail a score.
    """
    with _STDERR_REDIRECT, ExitStack() as cleanup:
        try:
            capture = cleanup.enter_context(tempfile.TemporaryFile())
            saved: int | None = os.dup(2)
        except OSError:
            saved = None
        if saved is None:
            yield
            return
        cleanup.callback(os.close, saved)
        _flush_stderr()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            capture.seek(0)
            lines = capture.read().splitlines(keepends=True)
            with open(2, "wb", closefd=False) as stderr:
                stderr.write(b"".join(line for line in lines if not line.startswith(b"PTBTokenizer tokenized ")))


def _flush_stderr() -> None:
    # Python's buffered writes go out before the descriptor changes (sys.stderr is None under pythonw)
    if sys.stderr is not None:
        sys.stderr.flush()


def _tokenize(captions: dict[int, list[dict[str, str]]]) -> dict[int, list[str]]:
    expected = {key: len(value) for key, value in captions.items()}
    try:
        with _without_tokenizer_summary():
            tokenized = PTBTokenizer().tokenize(captions)
    except PermissionError as err:
        raise PermissionError(
            f"pycocoevalcap's PTBTokenizer writes a temporary file next to its jar and could not: {err}. "
            "HINT: make pycocoevalcap's tokenizer/ folder writable."
        ) from err
    if {key: len(value) for key, value in tokenized.items()} != expected:
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given.")
    return tokenized


def _caption_compute(
    predictions: Sequence[str], references: Sequence[Sequence[str]], spice: bool = False
) -> dict[str, float]:
    """Corpus-level scores of `predictions` against `references`, as pycocoevalcap computes them."""
    if not predictions:
        raise ValueError("Caption scores need at least one sample, got none. HINT: call update() first.")
    _require_java()
    if spice:
        _require_spice()
    gts = _tokenize({i: [{"caption": ref} for ref in refs] for i, refs in enumerate(references)})
    if not any(ref for refs in gts.values() for ref in refs):
        # pycocoevalcap's ROUGE-L and CIDEr end in "max() arg is an empty sequence" on such a corpus
        raise ValueError(
            f"Every reference caption of the {len(references)} samples is empty once PTB-tokenised (the tokenizer "
            f"drops punctuation), e.g. {references[0]!r}. HINT: check the caption fields of the annotation file."
        )
    res = _tokenize({i: [{"caption": pred}] for i, pred in enumerate(predictions)})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)})
    meteor = Meteor()
    try:
        scores["meteor"] = float(meteor.compute_score(gts, res)[0])
    finally:
        del meteor  # its __del__ stops the JVM
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["spice"] = float(Spice().compute_score(gts, res)[0])
    log.debug("Caption scores over %d samples: %s", len(predictions), scores)
    return scores


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], spice: bool = False
) -> dict[str, float]:
    """Functional form of :class:`CaptionScores` (one process, no de-duplication).

    Args:
        predictions: one generated caption per sample.
        references: the human reference captions of each sample (one or more).
        spice: also compute SPICE (needs Stanford CoreNLP's jars next to pycocoevalcap's SPICE, see
            :class:`CaptionScores`).

    Returns:
        ``{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}`` (plus ``"spice"``) as floats,
        on pycocoevalcap's scale (fractions; CIDEr is not multiplied by 100).
    """
    if spice:
        _require_spice()
    predictions, references = _caption_update(predictions, references)
    return _caption_compute(predictions, references, spice=spice)


class CaptionScores(ListStateMetric):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE optional) of generated captions, gathered over DDP ranks.

    The text of every sample is kept as ``uint8`` tensors (see ``_states.py``) so torchmetrics gathers the whole
    split; :meth:`compute` drops repeated ``ids`` (the samples a ``DistributedSampler`` pads the last batch
    with) and scores the corpus once, on every rank (all ranks get the same numbers). Scoring starts JVMs
    (PTB tokenizer, METEOR): call :meth:`update` per batch and :meth:`compute` once per epoch, never the
    metric's ``forward`` (which would score every batch).

    Example::

        metric = CaptionScores()
        metric.update(["a dog runs on grass"], [["a dog running", "a brown dog on the lawn"]], ids=[42])
        metric.compute()  # {"bleu_1": ..., "bleu_4": ..., "meteor": ..., "rouge_l": ..., "cider": ...}

    Args:
        spice: also compute SPICE. SPICE needs Stanford CoreNLP's jars, which pycocoevalcap downloads on first
            use; without them (offline machines) this raises at construction instead of failing at the end of
            an evaluation.
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {
        **text_state_dtypes("pred", "ref", "id"),
        "refs_per_sample": torch.int64,
    }

    pred_bytes: list[Tensor]
    pred_lengths: list[Tensor]
    ref_bytes: list[Tensor]
    ref_lengths: list[Tensor]
    refs_per_sample: list[Tensor]
    id_bytes: list[Tensor]
    id_lengths: list[Tensor]

    def __init__(self, spice: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(spice, bool):
            raise TypeError(f"`spice` must be a bool, got {spice!r}.")
        _require_java()
        if spice:
            _require_spice()
        self.spice = spice

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        ids: Sequence[int | str] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            predictions: one generated caption per sample.
            references: the reference captions of each sample (a non-empty list per sample).
            ids: an id per sample (e.g. ``image_id``); a repeated id is scored once. None: no de-duplication.
        """
        predictions, references = _caption_update(predictions, references)
        keys = sample_ids(ids, len(predictions))
        flat_refs = [ref for refs in references for ref in refs]
        for prefix, texts in (("pred", predictions), ("ref", flat_refs), ("id", keys)):
            self._append_texts(prefix, texts)
        counts = torch.tensor([len(refs) for refs in references], dtype=torch.int64, device=self.device)
        self.refs_per_sample.append(counts)

    def compute(self) -> dict[str, float]:
        """Scores over every sample seen by every rank, each id once.

        Returns:
            ``{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}`` (plus ``"spice"`` with
            ``spice=True``) as floats on pycocoevalcap's scale (fractions; CIDEr is not multiplied by 100).
        """
        texts = {prefix: self._texts(prefix) for prefix in ("pred", "ref", "id")}
        references, start = [], 0
        for count in cat_state(self.refs_per_sample, torch.int64).tolist():
            references.append(texts["ref"][start : start + count])
            start += count
        keep = first_occurrences(texts["id"])
        predictions = [pred for pred, kept in zip(texts["pred"], keep, strict=True) if kept]
        references = [refs for refs, kept in zip(references, keep, strict=True) if kept]
        return _caption_compute(predictions, references, spice=self.spice)
