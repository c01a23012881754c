"""Text <-> tensor encoding and de-duplication used by the gathered metric states."""

from __future__ import annotations

import torch

from ecoflap_pl.metrics._states import decode_texts, encode_texts, first_occurrences, sample_ids


def test_texts_round_trip_through_uint8_tensors() -> None:
    texts = ["a dog", "", "naïve café — ok", "日本語", "x\ny"]
    data, lengths = encode_texts(texts)
    assert data.dtype == torch.uint8 and lengths.dtype == torch.int64 and lengths.tolist()[1] == 0
    assert decode_texts(data, lengths) == texts
    empty_data, empty_lengths = encode_texts([])
    assert decode_texts(empty_data, empty_lengths) == []


def test_first_occurrences_keeps_the_first_of_each_id_and_every_unnamed_sample() -> None:
    assert first_occurrences(["1", "2", "1", "", "", "2", "3"]) == [True, True, False, True, True, False, True]
    assert sample_ids([7, "coco_1", torch.tensor(3)], 3) == ["7", "coco_1", "3"]
    assert sample_ids(None, 2) == ["", ""]
