"""Text <-> tensor encoding and de-duplication used by the gathered metric states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecoflap_pl.metrics import CaptionScores, TopKAccuracy, VQAAccuracy
from ecoflap_pl.metrics._states import decode_texts, encode_texts, first_occurrences, sample_ids
from tests.metrics.metric_data import VQA_EXPECTED, VQA_QUESTIONS


def test_texts_round_trip_through_uint8_tensors() -> None:
    texts = ["a dog", "", "naïve café — ok", "日本語", "x\ny"]
    data, lengths = encode_texts(texts)
    assert data.dtype == torch.uint8 and lengths.dtype == torch.int64 and lengths.tolist()[1] == 0
    assert decode_texts(data, lengths) == texts
    empty_data, empty_lengths = encode_texts([])
    assert decode_texts(empty_data, empty_lengths) == []


def test_first_occurrences_keeps_the_first_of_each_id_and_every_unnamed_sample() -> None:
    assert first_occurrences(["1", "2", "1", "", "", "2", "3"]) == [True, True, False, True, True, False, True]
    assert first_occurrences([7, None, 7, "7", None, 8]) == [True, True, False, True, True, True]  # retrieval's ids
    assert sample_ids([7, "coco_1", torch.tensor(3)], 3) == ["7", "coco_1", "3"]
    assert sample_ids(None, 2) == ["", ""]
    assert sample_ids([5, None], 2) == ["5", ""]  # a sample without an id is never dropped


def test_states_survive_a_bfloat16_cast_of_the_lightning_module() -> None:
    # "bf16-true" precision calls module.to(torch.bfloat16), which converts every floating-point metric state
    vqa, captions, top1 = VQAAccuracy(), CaptionScores(), TopKAccuracy()
    nn.ModuleDict({"vqa": vqa, "captions": captions, "top1": top1}).to(torch.bfloat16)
    predictions, answers, types = zip(*VQA_QUESTIONS, strict=True)
    vqa.update(predictions, answers, types, question_ids=list(range(len(predictions))))
    captions.update(["a dog"], [["a brown dog"]], ids=["coco_1"])
    top1.update(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2]), ids=["a", "b", "c"])
    assert vqa.compute() == pytest.approx(VQA_EXPECTED, abs=1e-15)
    assert vqa.score_units[0].dtype == torch.int64 and vqa.id_bytes[0].dtype == torch.uint8
    assert captions.pred_bytes[0].dtype == torch.uint8 and captions.id_lengths[0].dtype == torch.int64
    assert top1.hits[0].dtype == torch.int64 and float(top1.compute()) == pytest.approx(2 / 3)
