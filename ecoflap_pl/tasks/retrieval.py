"""Image-text retrieval with CLIP, SigLIP, BLIP and BLIP-2: contrastive loss, Recall@K over the whole split.

The families differ only in how they embed an image and a caption and, for BLIP and BLIP-2, in their image-text
matching (ITM) head: the :class:`~ecoflap_pl.tasks.families.Towers` of each family's adapter hold that knowledge, and
the task is written once on top of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from ecoflap_pl.metrics import RetrievalRecall, retrieval_recall
from ecoflap_pl.models.loading import build_hf_model, check_tokenizer_source, expand_home
from ecoflap_pl.tasks.base import EcoflapTask
from ecoflap_pl.tasks.families import FamilyAdapter, Towers, family_for
from ecoflap_pl.tasks.families.towers import vision_dtype
from ecoflap_pl.tasks.model_config import load_config
from ecoflap_pl.tasks.retrieval_collator import RetrievalCollator
from ecoflap_pl.tasks.retrieval_losses import contrastive_loss, hard_negative_pairs, same_image
from ecoflap_pl.tasks.retrieval_split import Split, gather_split

log = logging.getLogger(__name__)

DEFAULT_ITM_TOP_K = 128
"""Candidates per query re-ranked by the ITM head (BLIP's ``k_test``: 128 on Flickr30k, 256 on COCO)."""
ITM_PAIRS_PER_FORWARD = 256
"""Image-caption pairs scored by one ITM forward during re-ranking (bounds the memory of the copied image states)."""


class RetrievalTask(EcoflapTask):
    """Image-text retrieval (COCO / Flickr30k Karpathy splits) with CLIP, SigLIP, BLIP or BLIP-2.

    The family comes from the config's ``model_type``: ``clip`` -> ``CLIPModel``, ``siglip`` -> ``SiglipModel``
    (captions padded to its fixed text length, no attention mask, as it was trained), ``blip`` ->
    ``BlipForImageTextRetrieval``, ``blip-2`` -> ``Blip2ForImageTextRetrieval`` (its Q-Former config needs
    ``use_qformer_text_input: true``, as in ``Salesforce/blip2-itm-vit-g``).

    Loss (docs/algorithm.md §2, also the fine-tuning loss): CLIP's own symmetric contrastive loss,
    SigLIP's own pairwise sigmoid loss (``return_loss=True``). BLIP / BLIP-2: symmetric InfoNCE of the ITC
    similarities divided by ``temperature``, captions of the same ``image_id`` in the batch counted as positives (as
    BLIP does), plus, with ``itm_loss``, the ITM cross-entropy on the positive pairs and one hard negative per image
    and per caption drawn from the ITC similarities (BLIP's recipe; without it the cross-attention layers get no
    signal). With ``self.model`` in eval mode (as during pruning) the negatives are drawn from a fixed-seed
    generator, so the loss is a deterministic function of the weights, which the zeroth-order estimator's
    ``L(θ+εz) − L(θ−εz)`` needs. Negatives come from this rank's batch only.

    Evaluation: text->image and image->text Recall@K over the whole split (every rank's images, a repeated
    ``image_id`` counted once), logged as ``val/t2i_r1`` ... ``val/i2t_r10``, ``val/t2i_r_mean``,
    ``val/i2t_r_mean``, ``val/r_mean`` (fractions; ``test/`` likewise). CLIP and BLIP without re-ranking go through
    :class:`~ecoflap_pl.metrics.RetrievalRecall`; BLIP-2 (best-query similarity) and ITM re-ranking gather the
    embeddings, score the split (each rank runs ITM on the pairs whose image it holds) and use
    :func:`~ecoflap_pl.metrics.retrieval_recall`. ITM re-ranking (BLIP's ``k_test``): each query's ``itm_top_k`` best
    candidates by similarity get score ``ITM match logit + similarity``, the rest rank below them. With re-ranking
    the vision encoder outputs of this rank's images stay on the device until the epoch ends.

    Args:
        pretrained: ``from_pretrained`` name or directory (``openai/clip-vit-base-patch16``,
            ``Salesforce/blip-itm-base-coco``, ``Salesforce/blip2-itm-vit-g``); the processor comes from
            ``AutoProcessor``.
        model_config: the model's config as a dict (with ``model_type``), for a randomly initialised model.
        tokenizer: a tokenizer directory; required with ``model_config`` (the image processor is then built at the
            vision config's ``image_size``), optional with ``pretrained`` (replaces the processor's tokenizer).
        itm_top_k: candidates per query re-ranked by the ITM head; 0 ranks by similarity alone. None: 128 for
            BLIP / BLIP-2, 0 for CLIP (which has no ITM head).
        itm_loss: add BLIP's ITM loss with hard negatives to the BLIP / BLIP-2 loss.
        temperature: ITC temperature of BLIP / BLIP-2 (their Hugging Face classes carry none; 0.07 is BLIP's
            initial value). CLIP uses its own ``logit_scale``.
        recall_at: the K values of Recall@K.
        max_length: captions are truncated to this many tokens; None: the tokenizer's ``model_max_length``, capped
            at the text position embeddings.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        itm_top_k: int | None = None,
        itm_loss: bool = True,
        temperature: float = 0.07,
        recall_at: Sequence[int] = (1, 5, 10),
        max_length: int | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        pretrained, tokenizer = expand_home(pretrained), expand_home(tokenizer)
        check_tokenizer_source(model_config, tokenizer)
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}. HINT: BLIP starts at 0.07.")
        config = load_config(pretrained, model_config, example="Salesforce/blip-itm-base-coco")
        self.family_adapter = family_for(config.model_type, "retrieval")
        self.family_adapter.check_config(config, "retrieval")
        self.family = self.family_adapter.model_type
        self.towers = _towers(self.family_adapter)
        self.model = build_hf_model(self.family_adapter.model_classes["retrieval"], pretrained, model_config)
        self.itm_top_k = _check_itm_top_k(itm_top_k, self.family, self.towers, recall_at)
        self.itm_loss = itm_loss and self.towers.has_itm
        self.temperature = temperature
        self.recall_at = tuple(recall_at)
        image_processor, text_tokenizer = self.family_adapter.processor_parts(self.model.config, pretrained, tokenizer)
        positions = self.family_adapter.text_max_positions(self.model.config)
        self.collator = RetrievalCollator(
            image_processor,
            text_tokenizer,
            _max_length(max_length, text_tokenizer, positions),
            padding="longest" if self.towers.text_attention_mask else "max_length",
        )
        self.val_recall = RetrievalRecall(top_k=self.recall_at)
        self.test_recall = RetrievalRecall(top_k=self.recall_at)
        self._uses_metric = self.towers.one_embedding_per_image and self.itm_top_k == 0
        self._split: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- loss
    @override
    def calibration_loss(self, batch: dict[str, Any]) -> Tensor:
        """Contrastive (+ ITM) loss on a batch with one caption per image (see the class docstring)."""
        num_images = batch["pixel_values"].shape[0]
        if batch["input_ids"].shape[0] != num_images:
            raise ValueError(
                f"Retrieval training and calibration batches must hold one caption per image, got {num_images} images "
                f"and {batch['input_ids'].shape[0]} captions. HINT: use training samples {{'image', 'image_id', "
                "'text'}, not evaluation samples with 'references'."
            )
        if self.towers.own_contrastive_loss:
            mask = {"attention_mask": batch["attention_mask"]} if self.towers.text_attention_mask else {}
            loss: Tensor = self.model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"].to(vision_dtype(self.model)),
                return_loss=True,
                **mask,
            ).loss
            return loss
        image = self.towers.image(self.model, batch["pixel_values"])
        text = self.towers.text(self.model, batch["input_ids"], batch["attention_mask"])
        similarity = self.towers.similarity(image.embeds, text).float()
        positives = same_image(batch["image_id"], similarity.device)
        loss = contrastive_loss(similarity / self.temperature, positives)
        if self.itm_loss and image.hidden is not None:
            loss = loss + self._itm_loss(image.hidden, batch, similarity, positives)
        return loss

    def _itm_loss(self, hidden: Tensor, batch: dict[str, Any], similarity: Tensor, positives: Tensor) -> Tensor:
        generator = None
        if not self.model.training:
            generator = torch.Generator(device=similarity.device).manual_seed(0)
        images, texts, labels = hard_negative_pairs(similarity.detach() / self.temperature, positives, generator)
        logits = self.towers.itm(
            self.model, hidden[images], batch["input_ids"][texts], batch["attention_mask"][texts]
        ).float()
        return F.cross_entropy(logits, labels)

    # ---------------------------------------------------------------- evaluation
    @override
    def on_validation_epoch_start(self) -> None:
        self._split = []

    @override
    def on_test_epoch_start(self) -> None:
        self._split = []

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_recall)

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_recall)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_recall(self.val_recall, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_recall(self.test_recall, "test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Normalised embeddings: ``image_embeds`` ``(B, D)`` or ``(B, Q, D)``, ``text_embeds`` ``(T, D)``."""
        image = self.towers.image(self.model, batch["pixel_values"])
        text = self.towers.text(self.model, batch["input_ids"], batch["attention_mask"])
        return {
            "image_id": batch["image_id"],
            "image_embeds": image.embeds.float().cpu(),
            "text_embeds": text.float().cpu(),
            "text_to_image": batch["text_to_image"].cpu(),
        }

    def _evaluate(self, batch: dict[str, Any], metric: RetrievalRecall) -> None:
        image = self.towers.image(self.model, batch["pixel_values"])
        text = self.towers.text(self.model, batch["input_ids"], batch["attention_mask"])
        if self._uses_metric:
            metric.update(image.embeds, text, batch["text_to_image"], _image_ids(batch["image_id"]))
            return
        self._split.append(
            {
                "image_embeds": image.embeds,
                "hidden": image.hidden if self.itm_top_k > 0 else None,
                "image_id": _image_ids(batch["image_id"]),
                "captions_per_image": torch.bincount(batch["text_to_image"], minlength=len(batch["image_id"])),
                "text_embeds": text,
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
            }
        )

    def _log_recall(self, metric: RetrievalRecall, prefix: str) -> None:
        if self._uses_metric:
            if not metric.update_count:
                return
            values = metric.compute()
            metric.reset()
        else:
            if not self._split:
                return
            values = self._score_split()
            self._split = []
        # identical on every rank; sync_dist (a mean of equal values) keeps Lightning from warning about it
        self.log_dict({f"{prefix}/{name}": value for name, value in values.items()}, batch_size=1, sync_dist=True)

    def _score_split(self) -> dict[str, float]:
        split = gather_split(self._split, self.itm_top_k > 0)
        similarity = self.towers.similarity(split.image_embeds, split.text_embeds).float()
        if self.itm_top_k == 0:
            return retrieval_recall(similarity, split.text_to_image, self.recall_at)
        i2t, t2i = self._rerank(similarity, split)
        image_queries = retrieval_recall(i2t, split.text_to_image, self.recall_at)
        text_queries = retrieval_recall(t2i, split.text_to_image, self.recall_at)
        values = {k: v for k, v in text_queries.items() if k.startswith("t2i_")}
        values.update({k: v for k, v in image_queries.items() if k.startswith("i2t_")})
        values["r_mean"] = (values["t2i_r_mean"] + values["i2t_r_mean"]) / 2
        return values

    def _rerank(self, similarity: Tensor, split: Split) -> tuple[Tensor, Tensor]:
        """BLIP's k_test re-ranking: ``(i2t, t2i)`` score matrices ``(num_images, num_texts)``, −inf off the top k.

        Each rank scores the pairs whose image it holds, then a max all-reduce combines the ranks.
        """
        num_images, num_texts = similarity.shape
        mine = split.owner == split.rank
        rows = torch.nonzero(mine).flatten()
        top_texts = similarity[rows].topk(min(self.itm_top_k, num_texts), dim=1).indices
        i2t_images, i2t_texts = rows.repeat_interleave(top_texts.shape[1]), top_texts.flatten()
        top_images = similarity.topk(min(self.itm_top_k, num_images), dim=0).indices
        t2i_texts = torch.arange(num_texts, device=similarity.device).expand_as(top_images).flatten()
        t2i_images = top_images.flatten()
        keep = mine[t2i_images]
        t2i_images, t2i_texts = t2i_images[keep], t2i_texts[keep]
        scores = []
        for images, texts in ((i2t_images, i2t_texts), (t2i_images, t2i_texts)):
            matrix = torch.full_like(similarity, float("-inf"))
            matrix[images, texts] = self._itm_scores(split, images, texts) + similarity[images, texts]
            if split.world_size > 1:
                torch.distributed.all_reduce(matrix, op=torch.distributed.ReduceOp.MAX)
            scores.append(matrix)
        return scores[0], scores[1]

    def _itm_scores(self, split: Split, images: Tensor, texts: Tensor) -> Tensor:
        """ITM match logits of (global image, text) pairs whose images this rank holds."""
        assert split.hidden is not None
        out = [torch.zeros(0, device=split.hidden.device)]
        for start in range(0, len(images), ITM_PAIRS_PER_FORWARD):
            image_rows = split.local_index[images[start : start + ITM_PAIRS_PER_FORWARD]]
            text_rows = texts[start : start + ITM_PAIRS_PER_FORWARD]
            mask = split.attention_mask[text_rows]
            length = int(mask.sum(dim=1).max())
            logits = self.towers.itm(
                self.model, split.hidden[image_rows], split.input_ids[text_rows, :length], mask[:, :length]
            )
            out.append(logits[:, 1].float())
        return torch.cat(out)


def _image_ids(ids: Sequence[Any]) -> list[int | str] | None:
    return None if any(image_id is None for image_id in ids) else list(ids)


def _towers(family: FamilyAdapter) -> Towers:
    if family.towers is None:
        raise ValueError(f"The {family.model_type} family has no contrastive towers for retrieval.")
    return family.towers


def _check_itm_top_k(itm_top_k: int | None, family: str, towers: Towers, recall_at: Sequence[int]) -> int:
    has_itm = towers.has_itm
    if itm_top_k is None:
        return DEFAULT_ITM_TOP_K if has_itm else 0
    if isinstance(itm_top_k, bool) or not isinstance(itm_top_k, int) or itm_top_k < 0:
        raise ValueError(f"`itm_top_k` must be an int >= 0 or None, got {itm_top_k!r}.")
    if itm_top_k > 0 and not has_itm:
        raise ValueError(
            f"`itm_top_k` must be 0 or None for {family!r}, got {itm_top_k!r}. HINT: only BLIP and BLIP-2 have an "
            "image-text matching head to re-rank with."
        )
    if 0 < itm_top_k < max(recall_at):
        raise ValueError(
            f"`itm_top_k` must be 0 or >= the largest Recall@K ({max(recall_at)}), got {itm_top_k!r}. HINT: BLIP "
            "re-ranks 128 (Flickr30k) or 256 (COCO) candidates."
        )
    return itm_top_k


def _max_length(max_length: int | None, tokenizer: Any, positions: int) -> int:
    if max_length is None:
        return min(tokenizer.model_max_length, positions)
    if not 1 <= max_length <= positions:
        raise ValueError(
            f"`max_length` must be in [1, {positions}] (the text position embeddings), got {max_length!r}. HINT: "
            "BLIP uses 35."
        )
    return max_length
