"""Two CPU processes (gloo): every metric gathered over 2 ranks equals the single-process value, also when the
``DistributedSampler`` pads the last batch with a repeated sample (an odd-sized split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from ecoflap_pl.metrics import (
    CaptionScores,
    MeanLoss,
    RetrievalRecall,
    TopKAccuracy,
    VQAAccuracy,
    mean_loss,
    retrieval_recall,
    top_k_accuracy,
    vqa_accuracy,
)
from tests.distributed import free_port, gloo_group
from tests.metrics.metric_data import (
    CAPTION_IDS,
    CAPTION_PREDICTIONS,
    CAPTION_REFERENCES,
    VQA_QUESTIONS,
    retrieval_data,
)

WORLD_SIZE = 2
NUM_IMAGES = 7  # odd: the DistributedSampler pads rank 1 with a repeat of image 0
NUM_QUESTIONS = 5  # odd: rank 1 gets a repeat of question 0 ("yes", scored 1.0)
NUM_SAMPLES = 9  # odd: rank 1 gets a repeat of sample 0 (top-K data below)


def _padded_indices(size: int, rank: int) -> list[int]:
    """The indices a padding ``DistributedSampler`` deals ``rank`` of a split of ``size`` samples."""
    return list(DistributedSampler(range(size), WORLD_SIZE, rank, shuffle=False))


def _classification_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[9, 6]`` and labels; sample 0 is a top-1 hit, so counting its repeat again raises top-1."""
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(NUM_SAMPLES, 6, generator=gen), torch.randint(0, 6, (NUM_SAMPLES,), generator=gen)
    labels[0] = logits[0].argmax()
    return logits, labels


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
        # VQA: the questions as a DistributedSampler deals them, padding repeat included
        vqa = VQAAccuracy()
        for i in _padded_indices(NUM_QUESTIONS, rank):
            prediction, answers, answer_type = VQA_QUESTIONS[i]
            vqa.update([prediction], [answers], [answer_type], question_ids=[262148000 + i])
        results["vqa"] = vqa.compute()
        # top-1 / top-5 (ids: ImageNet's image paths) and NLVR2 (2 classes, its identifiers), padding included
        logits, labels = _classification_data()
        indices = _padded_indices(NUM_SAMPLES, rank)
        for k in (1, 5):
            metric = TopKAccuracy(top_k=k)
            for start in range(0, len(indices), 2):
                batch = indices[start : start + 2]
                metric.update(logits[batch], labels[batch], ids=[f"n0144/{i}.JPEG" for i in batch])
            results[f"top{k}"] = float(metric.compute())
        nlvr2 = TopKAccuracy()
        nlvr2.update(logits[indices, :2], labels[indices] % 2, ids=[f"dev-{i}-0-0" for i in indices])
        results["nlvr2"] = float(nlvr2.compute())
        # the mean cross-entropy (float64 losses gathered as int64 bits), padding included, and with rank 1 empty
        losses = F.cross_entropy(logits, labels, reduction="none")
        loss, loss_one_rank = MeanLoss(), MeanLoss()
        for start in range(0, len(indices), 2):
            batch = indices[start : start + 2]
            loss.update(losses[batch], ids=[f"n0144/{i}.JPEG" for i in batch])
        if rank == 0:
            loss_one_rank.update(losses, ids=list(range(NUM_SAMPLES)))
        results["loss"], results["loss_one_rank"] = float(loss.compute()), float(loss_one_rank.compute())
        # top-1 where rank 1 saw nothing: its empty states must still gather
        lonely = TopKAccuracy()
        if rank == 0:
            lonely.update(logits, labels, ids=list(range(NUM_SAMPLES)))
        results["top1_one_rank"] = float(lonely.compute())
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
    predictions, answers, types = (list(column[:NUM_QUESTIONS]) for column in zip(*VQA_QUESTIONS, strict=True))
    vqa_single = vqa_accuracy(predictions, answers, types)
    # the old sums counted the repeat of question 0 again: a number that differs from the split's
    assert vqa_single["accuracy"] != pytest.approx(
        vqa_accuracy([*predictions, "yes"], [*answers, answers[0]])["accuracy"]
    )
    logits, labels = _classification_data()
    single = {f"top{k}": float(top_k_accuracy(logits, labels, top_k=k)) for k in (1, 5)}
    single["nlvr2"] = float(top_k_accuracy(logits[:, :2], labels % 2))
    padded = torch.cat([torch.arange(NUM_SAMPLES), torch.tensor([0])])
    assert single["top1"] != pytest.approx(float(top_k_accuracy(logits[padded], labels[padded])))
    losses = F.cross_entropy(logits, labels, reduction="none")
    single["loss"] = float(mean_loss(losses))
    assert single["loss"] != pytest.approx(float(mean_loss(losses[padded])))
    for rank in range(WORLD_SIZE):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["vqa"] == pytest.approx(vqa_single, abs=1e-15)
        for key in ("top1", "top5", "nlvr2"):
            assert results[key] == single[key], key  # integer counts: exactly the one-process number
        assert results["top1_one_rank"] == single["top1"]
        # float64 sums of the same numbers in another order (rank by rank): equal to the last bits or so
        assert results["loss"] == pytest.approx(single["loss"], rel=1e-14)
        assert results["loss_one_rank"] == pytest.approx(single["loss"], rel=1e-14)
        assert results["retrieval"] == pytest.approx(retrieval_single, abs=1e-6)
        assert results["retrieval_one_rank"] == pytest.approx(retrieval_single, abs=1e-6)
        # the ranks gather the samples in another order: float sums may differ in the last bits
        assert results["captions"] == pytest.approx(caption_scores_single, rel=1e-9, abs=1e-12)
