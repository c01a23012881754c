"""VQA accuracy (the official 10-answer rule, overall and per answer type) and the official results file."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ecoflap_pl.metrics._states import ListStateMetric, cat_state, first_occurrences, sample_ids, text_state_dtypes
from ecoflap_pl.metrics.vqa_normalization import normalize_answer, process_punctuation

log = logging.getLogger(__name__)

ANSWER_TYPES = ("yes/no", "number", "other")
_TYPE_KEYS = ("yes_no", "number", "other")
_MAX_ANSWERS = 10
# Every per-question accuracy is k / (3 n) with k an integer and n <= 10 answers, so it is a whole number of units
# of 1 / lcm(3, 6, ..., 30) = 1 / 7560: integer states sum exactly, in any order, and survive a bf16 cast.
_UNITS = 7560


def _score_numerator(prediction: str, answers: Sequence[str]) -> int:
    """``k`` of the official rule: sum over the human answers of min(3, matches among the other answers)."""
    pred = normalize_answer(prediction)
    # As the official script up to March 2021, the version LAVIS copies (see vqa_normalization.py): the human
    # answers are only punctuation-processed, and only when they disagree (the released annotations are already
    # normalised). The prediction always gets the full normalisation.
    refs = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(ref == pred for ref in refs)
    return sum(min(3, matches - (ref == pred)) for ref in refs)


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not 1 <= len(answers) <= _MAX_ANSWERS:
        raise ValueError(
            f"`answers` must hold 1 to {_MAX_ANSWERS} human answers per question, got {answers!r}. "
            "HINT: test splits have no answers; write their predictions with write_vqa_results()."
        )


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one predicted answer against the human answers (10 in VQAv2).

    For each human answer, ``min(1, #other human answers equal to the prediction / 3)``, averaged over the human
    answers. With ``m`` of 10 answers matching: ``m=0 -> 0``, ``1 -> 0.3``, ``2 -> 0.6``, ``3 -> 0.9``,
    ``>=4 -> 1``.

    Args:
        prediction: the model's answer (normalised here).
        answers: the human answers (1 to 10).
    """
    _check_answers(answers)
    return _score_numerator(prediction, answers) / (3 * len(answers))


def _vqa_update(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], answer_types: Sequence[str] | None
) -> tuple[Tensor, Tensor]:
    """Score units and answer-type slot (``yes/no``, ``number``, ``other``, untyped) of each question of a batch."""
    if isinstance(predictions, str) or not all(isinstance(p, str) for p in predictions):
        raise TypeError(f"`predictions` must be a sequence of strings, got {predictions!r}.")
    if len(answers) != len(predictions):
        raise ValueError(f"`answers` must hold one list per prediction ({len(predictions)}), got {len(answers)}.")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(
            f"`answer_types` must hold one type per prediction ({len(predictions)}), got {len(answer_types)}."
        )
    units, slots = [], []
    for i, (prediction, refs) in enumerate(zip(predictions, answers, strict=True)):
        _check_answers(refs)
        slot = len(ANSWER_TYPES)
        if answer_types is not None:
            if answer_types[i] not in ANSWER_TYPES:
                raise ValueError(
                    f"`answer_types` must hold values in {ANSWER_TYPES}, got {answer_types[i]!r}. "
                    "HINT: pass answer_types=None to report the overall accuracy only."
                )
            slot = ANSWER_TYPES.index(answer_types[i])
        units.append(_score_numerator(prediction, refs) * (_UNITS // (3 * len(refs))))
        slots.append(slot)
    return torch.tensor(units, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)


def _vqa_compute(units: Tensor, slots: Tensor, keys: Sequence[str]) -> dict[str, float]:
    """Accuracy overall and per answer type from each question's score units and slot, a repeated key once."""
    if units.numel() == 0:
        raise ValueError("VQA accuracy needs at least one question, got none. HINT: call update() first.")
    keep = torch.tensor(first_occurrences(keys), dtype=torch.bool, device=units.device)
    units, slots = units[keep], slots[keep]
    size = len(ANSWER_TYPES) + 1
    type_units = torch.zeros(size, dtype=torch.int64, device=units.device).index_add_(0, slots, units)
    counts = torch.bincount(slots, minlength=size)
    out = {"accuracy": int(units.sum()) / _UNITS / len(units)}
    for slot, key in enumerate(_TYPE_KEYS):
        if int(counts[slot]) > 0:
            out[f"accuracy_{key}"] = int(type_units[slot]) / _UNITS / int(counts[slot])
    return out


class VQAAccuracy(ListStateMetric):
    """Official VQA accuracy, overall and per answer type, over the whole split, each ``question_id`` once.

    Predictions are normalised like the official script (see ``vqa_normalization.py``) and scored by the
    10-answer rule of :func:`vqa_score`. Each question's score (an integer number of units of 1/7560, exact in any
    order and through a bf16 cast of the LightningModule), answer type and ``question_id`` go into ``cat`` states,
    so under DDP :meth:`compute` sees every question and drops those a padding ``DistributedSampler`` repeats: the
    accuracy equals a one-device run whatever the world size. Without ``question_ids`` every question counts,
    repeats included.

    Example::

        metric = VQAAccuracy()
        metric.update(["two"], [["2"] * 10], answer_types=["number"], question_ids=[262148000])
        metric.compute()  # {"accuracy": 1.0, "accuracy_number": 1.0}

    Args:
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True
    _list_state_dtypes: ClassVar[dict[str, torch.dtype]] = {
        "score_units": torch.int64,
        "answer_type_slots": torch.int64,
        **text_state_dtypes("id"),
    }

    score_units: list[Tensor]
    answer_type_slots: list[Tensor]
    id_bytes: list[Tensor]
    id_lengths: list[Tensor]

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        answer_types: Sequence[str] | None = None,
        question_ids: Sequence[int | str | None] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            predictions: the model's answer per question.
            answers: the human answers per question (10 in VQAv2 / OK-VQA; 1 to 10 accepted).
            answer_types: ``"yes/no"``, ``"number"`` or ``"other"`` per question, or None (overall only).
            question_ids: the ``question_id`` per question; a repeated id is scored once. None (or a None id): no
                de-duplication of those questions.
        """
        units, slots = _vqa_update(predictions, answers, answer_types)
        keys = sample_ids(question_ids, len(predictions), arg="question_ids")
        self.score_units.append(units.to(self.device))
        self.answer_type_slots.append(slots.to(self.device))
        self._append_texts("id", keys)

    def compute(self) -> dict[str, float]:
        """Accuracy as a fraction in [0, 1] (the official script prints 100 times this).

        Returns:
            ``{"accuracy"}`` plus ``"accuracy_yes_no"``, ``"accuracy_number"``, ``"accuracy_other"`` for each
            answer type that has questions.
        """
        units = cat_state(self.score_units, torch.int64)
        return _vqa_compute(units, cat_state(self.answer_type_slots, torch.int64), self._texts("id"))


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    question_ids: Sequence[int | str | None] | None = None,
) -> dict[str, float]:
    """Functional form of :class:`VQAAccuracy` (same arguments as its ``update``, same keys as its ``compute``)."""
    units, slots = _vqa_update(predictions, answers, answer_types)
    return _vqa_compute(units, slots, sample_ids(question_ids, len(predictions), arg="question_ids"))


def write_vqa_results(path: str | Path, question_ids: Sequence[int], answers: Sequence[str]) -> Path:
    """Write the official VQA results file ``[{"question_id": int, "answer": str}, ...]`` for the test server.

    Each question is written once (the first answer seen wins, so the duplicates of a padding
    ``DistributedSampler`` drop out), sorted by ``question_id``. Answers are written as given: the server
    normalises them itself. Gathering the answers of all ranks is the caller's job (one file, from rank 0).

    Args:
        path: the JSON file to write (parent folders are created).
        question_ids: the ``question_id`` of each answer.
        answers: the predicted answer per question.

    Returns:
        The path written.
    """
    if len(question_ids) != len(answers):
        raise ValueError(f"`answers` must hold one answer per question id ({len(question_ids)}), got {len(answers)}.")
    results: dict[int, str] = {}
    for question_id, answer in zip(question_ids, answers, strict=True):
        if isinstance(question_id, Tensor):
            question_id = question_id.item()
        if isinstance(question_id, bool) or not isinstance(question_id, int):
            raise TypeError(f"`question_ids` must hold ints, got {question_id!r}.")
        if not isinstance(answer, str):
            raise TypeError(f"`answers` must hold strings, got {answer!r}.")
        results.setdefault(question_id, answer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = [{"question_id": qid, "answer": results[qid]} for qid in sorted(results)]
    path.write_text(json.dumps(payload))
    log.info("Wrote %d VQA answers to %s", len(payload), path)
    return path
