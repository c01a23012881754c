"""Two CPU processes (gloo): every metric gathered over 2 ranks equals the single-process value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from ecoflap_pl.metrics import CaptionScores, RetrievalRecall, VQAAccuracy, retrieval_recall
from tests.distributed import free_port, gloo_group
from tests.metrics.metric_data import (
    CAPTION_IDS,
    CAPTION_PREDICTIONS,
    CAPTION_REFERENCES,
    VQA_EXPECTED,
    VQA_QUESTIONS,
    retrieval_data,
)

WORLD_SIZE = 2
NUM_IMAGES = 7  # odd: the DistributedSampler pads rank 1 with a repeat of image 0


def _retrieval_update(metric: RetrievalRecall, indices: list[int]) -> None:
    images, texts, text_to_image = retrieval_data(seed=3, num_images=NUM_IMAGES)
    for start in range(0, len(indices), 2):  # batches of 2 images with their captions
        batch = indices[start : start + 2]
        rows = [t for i in batch for t in torch.nonzero(text_to_image == i).flatten().tolist()]
        local = torch.tensor([batch.index(int(text_to_image[t])) for t in rows])
        metric.update(images[batch], texts[rows], local, image_ids=batch)


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD_SIZE, port):
        results = {}
        # VQA: every question on exactly one rank (sum states cannot drop a padding repeat)
        vqa = VQAAccuracy()
        for prediction, answers, answer_type in VQA_QUESTIONS[rank::WORLD_SIZE]:
            vqa.update([prediction], [answers], [answer_type])
        results["vqa"] = vqa.compute()
        # retrieval: the split as a DistributedSampler deals it, padding repeat included
        retrieval = RetrievalRecall()
        _retrieval_update(retrieval, list(DistributedSampler(range(NUM_IMAGES), WORLD_SIZE, rank, shuffle=False)))
        results["retrieval"] = retrieval.compute()
        # retrieval where rank 1 saw nothing: its empty states must still gather
        lonely = RetrievalRecall()
        if rank == 0:
            _retrieval_update(lonely, list(range(NUM_IMAGES)))
        results["retrieval_one_rank"] = lonely.compute()
        # captions: rank 0 gets 0, 2, 4; rank 1 gets 1, 3, 5 and a padding repeat of 0
        indices = list(range(rank, len(CAPTION_IDS), WORLD_SIZE)) + ([0] if rank == 1 else [])
        captions = CaptionScores()
        captions.update(
            [CAPTION_PREDICTIONS[i] for i in indices],
            [CAPTION_REFERENCES[i] for i in indices],
            ids=[CAPTION_IDS[i] for i in indices],
        )
        results["captions"] = captions.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path: Path, caption_scores_single: dict[str, float]) -> None:
    # fork: the children inherit the imported modules (a spawned child spends ~10 s re-importing torchmetrics)
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="fork")
    images, texts, text_to_image = retrieval_data(seed=3, num_images=NUM_IMAGES)
    retrieval_single = retrieval_recall(images @ texts.T, text_to_image)
    for rank in range(WORLD_SIZE):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["vqa"] == pytest.approx(VQA_EXPECTED, abs=1e-15)
        assert results["retrieval"] == pytest.approx(retrieval_single, abs=1e-6)
        assert results["retrieval_one_rank"] == pytest.approx(retrieval_single, abs=1e-6)
        # the ranks gather the samples in another order: float sums may differ in the last bits
        assert results["captions"] == pytest.approx(caption_scores_single, rel=1e-9, abs=1e-12)
