"""RetrievalTask: CLIP / BLIP / BLIP-2 batches, losses, fine-tuning, Recall@K against brute force, errors."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import IMAGE_ID, train_tokenizer
from ecoflap_pl.tasks.retrieval import RetrievalTask
from ecoflap_pl.tasks.retrieval_losses import contrastive_loss, hard_negative_pairs
from tests.metrics.metric_data import recall_from_ranks
from tests.tasks.task_helpers import fit_changed_weights

CAPTIONS = [
    "a dog runs on the grass",
    "two cats sleep on a red sofa",
    "a man rides a bike in the city",
    "a plate of food on a table",
    "children play football in a park",
    "a red bus stops at the station",
    "a bird sits on a tree branch",
    "a woman reads a book by the window",
]
RECALL_AT = (1, 2, 3)


def _config(family: str) -> dict[str, Any]:
    if family == "clip":
        return tiny_config("clip").to_dict()
    config = tiny_config("blip" if family == "blip" else "blip2_opt").to_dict() | {"image_text_hidden_size": 32}
    if family == "blip2":
        config["qformer_config"]["use_qformer_text_input"] = True
    return config


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dirs = {}
    for family, template in (("clip", "bos_eos"), ("blip", "cls_sep"), ("blip2", "cls_sep")):
        path = tmp_path_factory.mktemp(f"{family}_tokenizer")
        train_tokenizer(CAPTIONS * 3, vocab_size=128, template=template).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def _task(family: str, tokenizers: dict[str, str], seed: int = 0, **kwargs: Any) -> RetrievalTask:
    torch.manual_seed(seed)
    kwargs.setdefault("recall_at", RECALL_AT)
    return RetrievalTask(model_config=_config(family), tokenizer=tokenizers[family], **kwargs)


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _train_samples(n: int = 4) -> list[dict[str, Any]]:
    return [{"image": _image(i), "image_id": i, "text": CAPTIONS[i]} for i in range(n)]


def _eval_samples(n: int = 4) -> list[dict[str, Any]]:
    # 2 or 3 captions per image, all distinct
    return [
        {
            "image": _image(100 + i),
            "image_id": f"img_{i}",
            "references": [CAPTIONS[(i + j) % 8] + f" {j}" * j for j in range(2 + i % 2)],
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------ reference implementations
def _reference_recall(i2t: torch.Tensor, t2i: torch.Tensor, text_to_image: list[int], ks: tuple[int, ...]) -> dict:
    """Slow loops: a text query's rank = wrong images scoring >= its image; an image query's rank = other images'
    captions scoring >= its best caption (ties count against the query)."""
    num_images, num_texts = i2t.shape
    t2i_ranks = [
        sum(1 for j in range(num_images) if j != text_to_image[t] and t2i[j, t] >= t2i[text_to_image[t], t])
        for t in range(num_texts)
    ]
    i2t_ranks = []
    for i in range(num_images):
        best = max(i2t[i, t] for t in range(num_texts) if text_to_image[t] == i)
        i2t_ranks.append(sum(1 for t in range(num_texts) if text_to_image[t] != i and i2t[i, t] >= best))
    return recall_from_ranks(t2i_ranks, i2t_ranks, ks)


def _hf_scores(task: RetrievalTask, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The model's own similarity ``(num_images, num_texts)`` and ITM match logits of every pair, through the
    Hugging Face forward (not the task's towers)."""
    batch = task.collator(samples)
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    num_images, num_texts = pixels.shape[0], ids.shape[0]
    model = task.model.eval()
    itm = torch.zeros(num_images, num_texts)
    with torch.no_grad():
        if task.family == "clip":
            similarity = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
        elif task.family == "blip":
            similarity = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
            for i in range(num_images):
                repeated = pixels[i : i + 1].expand(num_texts, -1, -1, -1)
                itm[i] = model(input_ids=ids, attention_mask=mask, pixel_values=repeated).itm_score[:, 1]
        else:  # BLIP-2's forward strips the <image> tokens its processor prepends (config.image_token_index)
            queries = model.config.num_query_tokens
            ids = torch.cat([torch.full((num_texts, queries), IMAGE_ID), ids], dim=1)
            mask = torch.cat([torch.ones(num_texts, queries, dtype=mask.dtype), mask], dim=1)
            similarity = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
            for i in range(num_images):
                repeated = pixels[i : i + 1].expand(num_texts, -1, -1, -1)
                output = model(
                    input_ids=ids, attention_mask=mask, pixel_values=repeated, use_image_text_matching_head=True
                )
                itm[i] = output.logits_per_image[:, 1]
    return similarity, itm, batch["text_to_image"].tolist()


def _reranked(similarity: torch.Tensor, itm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    i2t = torch.full_like(similarity, float("-inf"))
    t2i = torch.full_like(similarity, float("-inf"))
    for i in range(similarity.shape[0]):
        for t in similarity[i].topk(min(k, similarity.shape[1])).indices.tolist():
            i2t[i, t] = itm[i, t] + similarity[i, t]
    for t in range(similarity.shape[1]):
        for i in similarity[:, t].topk(min(k, similarity.shape[0])).indices.tolist():
            t2i[i, t] = itm[i, t] + similarity[i, t]
    return i2t, t2i


# ------------------------------------------------------------------ collator
def test_collator_training_and_evaluation_batches(tokenizers: dict[str, str]) -> None:
    task = _task("blip", tokenizers)
    train = task.collator(_train_samples(3))
    assert train["pixel_values"].shape == (3, 3, 32, 32)
    assert train["input_ids"].shape[0] == 3 and train["text_to_image"].tolist() == [0, 1, 2]
    assert train["image_id"] == [0, 1, 2]
    evaluation = pickle.loads(pickle.dumps(task.collator))(_eval_samples(3))
    assert evaluation["pixel_values"].shape[0] == 3
    assert evaluation["text_to_image"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert evaluation["input_ids"].shape == evaluation["attention_mask"].shape and evaluation["input_ids"].shape[0] == 7
    assert evaluation["image_id"] == ["img_0", "img_1", "img_2"]


def test_collator_rejects_empty_references(tokenizers: dict[str, str]) -> None:
    task = _task("clip", tokenizers)
    with pytest.raises(ValueError, match="`references` of image 'x' must be a non-empty list"):
        task.collator([{"image": _image(0), "image_id": "x", "references": []}])


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("family", ["clip", "blip", "blip2"])
def test_calibration_loss_is_a_finite_scalar_with_grad(family: str, tokenizers: dict[str, str]) -> None:
    task = _task(family, tokenizers)
    loss = task.calibration_loss(task.collator(_train_samples()))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = {name for name, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("vision_model.encoder" in name for name in grads)
    if family == "blip":  # the ITM loss reaches the cross-attention layers
        assert any("crossattention" in name for name in grads)


def test_clip_loss_is_the_symmetric_infonce_of_its_embeddings(tokenizers: dict[str, str]) -> None:
    task = _task("clip", tokenizers)
    batch = task.collator(_train_samples())
    model = task.model.eval()
    with torch.no_grad():
        images = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        texts = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        texts = texts.pooler_output
        logits = model.logit_scale.exp() * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
        targets = torch.arange(4)
        expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        assert task.calibration_loss(batch) == pytest.approx(float(expected), abs=1e-5)


def test_blip_itc_loss_uses_the_models_own_similarity(tokenizers: dict[str, str]) -> None:
    task = _task("blip", tokenizers, itm_loss=False, temperature=0.1)
    samples = _train_samples()
    samples[3]["image_id"] = samples[1]["image_id"]  # two captions of one image: both positives
    batch = task.collator(samples)
    model = task.model.eval()
    with torch.no_grad():
        similarity = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            use_itm_head=False,
        ).itm_score
        logits = similarity / 0.1
        positives = [[i == j or {i, j} == {1, 3} for j in range(4)] for i in range(4)]
        terms = []
        for matrix in (logits, logits.T):
            for i in range(4):
                log_p = matrix[i].log_softmax(0)
                row = [log_p[j] for j in range(4) if positives[i][j]]
                terms.append(-sum(row) / len(row) / 8)
        assert task.calibration_loss(batch) == pytest.approx(float(sum(terms)), abs=1e-5)


def test_contrastive_loss_with_only_diagonal_positives_is_cross_entropy() -> None:
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(5)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert torch.allclose(contrastive_loss(logits, torch.eye(5, dtype=torch.bool)), expected)


def test_hard_negatives_are_never_positives() -> None:
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    images, captions, labels = hard_negative_pairs(logits, positives, torch.Generator().manual_seed(0))
    assert labels.tolist() == [1] * 4 + [0] * 8
    assert images[:4].tolist() == captions[:4].tolist() == [0, 1, 2, 3]
    assert not positives[images[4:], captions[4:]].any()
    again = hard_negative_pairs(logits, positives, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], images) and torch.equal(again[1], captions)
    # a batch of one image has no negative at all
    images, captions, labels = hard_negative_pairs(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert labels.tolist() == [1]


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_loss_in_eval_mode_is_deterministic(family: str, tokenizers: dict[str, str]) -> None:
    task = _task(family, tokenizers)
    task.model.eval()
    batch = task.collator(_train_samples())
    with torch.no_grad():
        assert torch.equal(task.calibration_loss(batch), task.calibration_loss(batch))


def test_calibration_rejects_evaluation_batches(tokenizers: dict[str, str]) -> None:
    task = _task("clip", tokenizers)
    with pytest.raises(ValueError, match="one caption per image"):
        task.calibration_loss(task.collator(_eval_samples(2)))


# ------------------------------------------------------------------ Trainer
@pytest.mark.parametrize("family", ["clip", "blip"])
def test_training_steps_change_the_weights(
    family: str, tokenizers: dict[str, str], trainer_factory: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    task = _task(family, tokenizers, learning_rate=1e-2, itm_top_k=0)
    trainer = trainer_factory()
    changed = fit_changed_weights(task, trainer, _train_samples(4))
    assert any("vision_model.encoder" in name for name in changed)
    assert any("text" in name and "layer" in name for name in changed)
    trainer.save_checkpoint(tmp_path / "retrieval.ckpt")
    restored = RetrievalTask.load_from_checkpoint(tmp_path / "retrieval.ckpt")
    assert restored.family == task.family and restored.itm_top_k == 0 and restored.recall_at == RECALL_AT
    batch = task.collator(_train_samples(2))
    with torch.no_grad():
        expected = task.towers.image(task.model.eval(), batch["pixel_values"]).embeds
        assert torch.equal(restored.towers.image(restored.model.eval(), batch["pixel_values"]).embeds, expected)


KEYS = {f"{d}_r{k}" for d in ("t2i", "i2t") for k in RECALL_AT} | {"t2i_r_mean", "i2t_r_mean", "r_mean"}


@pytest.mark.parametrize(
    ("family", "itm_top_k"), [("clip", None), ("blip", 0), ("blip", None), ("blip", 3), ("blip2", 0), ("blip2", 3)]
)
def test_validation_recall_equals_brute_force(
    family: str, itm_top_k: int | None, tokenizers: dict[str, str], trainer_factory: Callable[..., pl.Trainer]
) -> None:
    task = _task(family, tokenizers, itm_top_k=itm_top_k)
    samples = _eval_samples(5)
    similarity, itm, text_to_image = _hf_scores(task, samples)
    if task.itm_top_k:
        expected = _reference_recall(*_reranked(similarity, itm, task.itm_top_k), text_to_image, RECALL_AT)
    else:
        expected = _reference_recall(similarity, similarity, text_to_image, RECALL_AT)
    loader = DataLoader(samples, batch_size=2, collate_fn=task.collator)
    (metrics,) = trainer_factory().validate(task, dataloaders=loader, verbose=False)
    assert metrics == pytest.approx({f"val/{k}": v for k, v in expected.items()}, abs=1e-6)
    assert set(metrics) == {f"val/{k}" for k in KEYS}
    (metrics,) = trainer_factory().test(task, dataloaders=loader, verbose=False)
    assert metrics == pytest.approx({f"test/{k}": v for k, v in expected.items()}, abs=1e-6)


@pytest.mark.parametrize("family", ["clip", "blip2"])
def test_aligned_embeddings_give_perfect_recall(family: str, tokenizers: dict[str, str]) -> None:
    """Each image embedded exactly as its caption: a perfectly aligned model recalls everything at rank 1."""
    task = _task(family, tokenizers, itm_top_k=0)
    samples = [{"image": _image(i), "image_id": i, "references": [CAPTIONS[i]]} for i in range(6)]
    batch = task.collator(samples)
    with torch.no_grad():
        texts = task.towers.text(task.model, batch["input_ids"], batch["attention_mask"])
    if family == "clip":  # through RetrievalRecall
        task.val_recall.update(texts, texts, batch["text_to_image"], batch["image_id"])
        values = task.val_recall.compute()
    else:  # through the split gathering of the BLIP-2 path: every query of an image equals its caption
        queries = texts[:, None].expand(-1, task.model.config.num_query_tokens, -1)
        for part in (slice(0, 4), slice(4, 6)):
            task._split.append(
                {
                    "image_embeds": queries[part],
                    "hidden": None,
                    "image_id": batch["image_id"][part],
                    "captions_per_image": torch.ones(len(batch["image_id"][part]), dtype=torch.long),
                    "text_embeds": texts[part],
                    "input_ids": batch["input_ids"][part],
                    "attention_mask": batch["attention_mask"][part],
                }
            )
        values = task._score_split()
    assert values == {k: 1.0 for k in KEYS}


def test_duplicate_image_ids_are_counted_once(
    tokenizers: dict[str, str], trainer_factory: Callable[..., pl.Trainer]
) -> None:
    """A padding DistributedSampler repeats samples; the repeated image and its captions are scored once."""
    task = _task("blip", tokenizers, itm_top_k=3)
    samples = _eval_samples(4)
    loader = DataLoader(samples + samples[:1], batch_size=2, collate_fn=task.collator)
    (repeated,) = trainer_factory().validate(task, dataloaders=loader, verbose=False)
    (plain,) = trainer_factory().validate(
        task, DataLoader(samples, batch_size=2, collate_fn=task.collator), verbose=False
    )
    assert repeated == pytest.approx(plain)


def test_predict_step_returns_embeddings(tokenizers: dict[str, str]) -> None:
    task = _task("blip2", tokenizers)
    with torch.no_grad():
        out = task.predict_step(task.collator(_eval_samples(2)), 0)
    queries = task.model.config.num_query_tokens
    assert out["image_embeds"].shape == (2, queries, 32) and out["text_embeds"].shape == (5, 32)
    assert torch.allclose(out["text_embeds"].norm(dim=-1), torch.ones(5))
    assert out["image_id"] == ["img_0", "img_1"] and out["text_to_image"].tolist() == [0, 0, 1, 1, 1]


# ------------------------------------------------------------------ errors
def test_clip_has_no_itm_head(tokenizers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="`itm_top_k` must be 0 or None for 'clip'"):
        _task("clip", tokenizers, itm_top_k=16)


def test_itm_top_k_below_the_largest_k_is_rejected(tokenizers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"`itm_top_k` must be 0 or >= the largest Recall@K \(10\)"):
        _task("blip", tokenizers, itm_top_k=5, recall_at=(1, 5, 10))


def test_blip2_needs_the_qformer_text_input(tokenizers: dict[str, str]) -> None:
    config = _config("blip2")
    config["qformer_config"]["use_qformer_text_input"] = False
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        RetrievalTask(model_config=config, tokenizer=tokenizers["blip2"])


def test_unknown_model_type_is_rejected(tokenizers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="`model_type` must be one of"):
        RetrievalTask(model_config=tiny_config("vilt").to_dict(), tokenizer=tokenizers["blip"])


def test_model_config_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="`tokenizer` must be given with `model_config`"):
        RetrievalTask(model_config=_config("clip"))


def test_exactly_one_model_source() -> None:
    with pytest.raises(ValueError, match="Exactly one of `pretrained` and `model_config`"):
        RetrievalTask()


@pytest.mark.distributed
def test_recall_under_two_process_ddp_equals_one_process(
    tokenizers: dict[str, str], trainer_factory: Callable[..., pl.Trainer]
) -> None:
    """5 images on 2 ranks: the sampler repeats one; ITM pairs are split by the rank holding the image."""
    task = _task("blip", tokenizers, itm_top_k=3)
    samples = _eval_samples(5)
    loader = DataLoader(samples, batch_size=1, collate_fn=task.collator)
    (single,) = trainer_factory().validate(task, dataloaders=loader, verbose=False)
    trainer = trainer_factory(strategy="ddp_spawn", devices=2, use_distributed_sampler=True)
    (distributed,) = trainer.validate(task, dataloaders=loader, verbose=False)
    assert distributed == pytest.approx(single, abs=1e-6)
