"""RetrievalRecall against a brute-force loop, including ties, and the embedding / de-duplication path."""

from __future__ import annotations

import pytest
import torch

from ecoflap_pl.metrics import RetrievalRecall, retrieval_recall
from tests.metrics.metric_data import recall_from_ranks, retrieval_data


def _reference(similarity: torch.Tensor, text_to_image: torch.Tensor, top_k: tuple[int, ...]) -> dict[str, float]:
    """Sort every query's candidates, a tie placing the right candidates AFTER the wrong ones (ties count against
    the query), and take the position of the first right candidate as its rank."""
    num_images, num_texts = similarity.shape
    sim = similarity.tolist()
    gt = text_to_image.tolist()
    t2i_ranks = []
    for t in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-sim[i][t], i == gt[t]))
        t2i_ranks.append(order.index(gt[t]))
    i2t_ranks = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda t: (-sim[i][t], gt[t] == i))
        i2t_ranks.append(min(position for position, t in enumerate(order) if gt[t] == i))
    return recall_from_ranks(t2i_ranks, i2t_ranks, top_k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "integer-scores-with-ties"])
def test_matches_brute_force_loop(seed: int, ties: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_images = int(torch.randint(2, 15, (1,), generator=gen))
    text_to_image = torch.repeat_interleave(torch.arange(num_images), torch.randint(1, 6, (num_images,), generator=gen))
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]  # captions in any order
    shape = (num_images, len(text_to_image))
    similarity = torch.randint(0, 3, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen)
    top_k = (1, 2, 5, 10)
    assert retrieval_recall(similarity, text_to_image, top_k) == pytest.approx(
        _reference(similarity, text_to_image, top_k), abs=1e-12
    )


def test_ties_count_against_the_query() -> None:
    # constant scores (collapsed embeddings): every query has all wrong candidates tied with the right one.
    # 3 images x 2 captions: a text query's rank is 2 (both other images tie), an image query's rank is 4 (the
    # 4 captions of the other images tie with its best one): hits only once K exceeds those ranks.
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    result = retrieval_recall(torch.zeros(3, 6), text_to_image, top_k=(1, 2, 3, 4, 5))
    assert [result[f"t2i_r{k}"] for k in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 1]
    assert [result[f"i2t_r{k}"] for k in (1, 2, 3, 4, 5)] == [0, 0, 0, 0, 1]
    # a caption tying with another caption of the SAME image does not hurt: image 0 still ranks first
    similarity = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_recall(similarity, torch.tensor([0, 0, 1]), top_k=(1,))["i2t_r1"] == 1.0


def test_embeddings_path_equals_functional_on_the_whole_split() -> None:
    images, texts, text_to_image = retrieval_data(seed=1, num_images=7)
    expected = retrieval_recall(images @ texts.T, text_to_image)
    metric = RetrievalRecall()
    starts = [0, 3, 7]
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        in_batch = (text_to_image >= lo) & (text_to_image < hi)
        shuffle = torch.randperm(int(in_batch.sum()), generator=torch.Generator().manual_seed(lo))
        metric.update(
            images[lo:hi],
            texts[in_batch][shuffle],
            (text_to_image[in_batch] - lo)[shuffle],
            image_ids=list(range(lo, hi)),
        )
    # a padding duplicate of image 0 (same id): dropped with its captions
    first = text_to_image == 0
    metric.update(images[:1], texts[first], text_to_image[first], image_ids=[0])
    assert metric.compute() == pytest.approx(expected, abs=1e-6)
    assert list(expected) == [
        "t2i_r1", "t2i_r5", "t2i_r10", "t2i_r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "i2t_r_mean", "r_mean",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("similarity", "text_to_image", "top_k", "match"),
    [
        (torch.zeros(2, 2), torch.tensor([0, 1]), (0, 5), "`top_k` must be a non-empty sequence of positive ints"),
        (torch.zeros(2, 2), torch.tensor([0, 1]), 5, "`top_k` must be a non-empty sequence"),
        (torch.zeros(2), torch.tensor([0, 1]), (1,), r"`similarity` must be \[num_images, num_texts\]"),
        (torch.zeros(2, 2), torch.tensor([0]), (1,), r"one image index per text \(2\)"),
        (torch.zeros(2, 2), torch.tensor([0, 2]), (1,), r"`text_to_image` must index images 0..1"),
        (torch.zeros(2, 2), torch.tensor([0, 0]), (1,), r"images \[1\] have none"),
    ],
)
def test_functional_rejects_bad_input(similarity, text_to_image, top_k, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        retrieval_recall(similarity, text_to_image, top_k)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_update_rejects_bad_input() -> None:
    metric = RetrievalRecall()
    with pytest.raises(ValueError, match="same dim"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"this batch's images 0..1"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"`image_ids` must have one id per sample \(2\)"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 1]), image_ids=[1])
    with pytest.raises(ValueError, match="at least one image"):
        metric.compute()


def test_nan_scores_rank_below_every_score_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    # image 1's embedding overflowed: its row is NaN. As -inf: text 1's image scores below images 0 and 2 (rank 2,
    # a miss at K=1) and image 1's caption below the other captions (rank 2, a miss); the other four queries are
    # unaffected hits. Compared as NaN, both were hits (NaN >= x is always False: rank 0), so a model emitting NaN
    # everywhere scored a perfect 1.0.
    nan = float("nan")
    similarity = torch.tensor([[1.0, 0.0, 0.0], [nan, nan, nan], [0.0, 0.0, 1.0]])
    with caplog.at_level("WARNING", logger="ecoflap_pl.metrics.retrieval"):
        result = retrieval_recall(similarity, torch.tensor([0, 1, 2]), top_k=(1,))
    assert result["t2i_r1"] == pytest.approx(2 / 3) and result["i2t_r1"] == pytest.approx(2 / 3)
    assert "3 of 9 image-text scores are NaN" in caplog.text
    # all NaN: every query ties with every wrong candidate (ranks 2 and 4 for 3 images x 2 captions): no hit at K<=2
    metric = RetrievalRecall(top_k=(1, 2))
    metric.update(torch.full((3, 4), nan), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), image_ids=[1, 2, 3])
    assert set(metric.compute().values()) == {0.0}
