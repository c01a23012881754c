"""Image-text retrieval with CLIP, BLIP and BLIP-2: contrastive loss, Recall@K over the whole split.

The three families differ only in how they embed an image and a caption and, for BLIP and BLIP-2, in their
image-text matching (ITM) head; :class:`_Towers` holds that per-family knowledge (one small class each) and the task
is written once on top of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForImageTextRetrieval,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedModel,
)
from typing_extensions import override

from ecoflap_pl.metrics import RetrievalRecall, retrieval_recall
from ecoflap_pl.models.loading import build_hf_model, check_model_source, check_tokenizer_source, load_tokenizer
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)

DEFAULT_ITM_TOP_K = 128
"""Candidates per query re-ranked by the ITM head (BLIP's ``k_test``: 128 on Flickr30k, 256 on COCO)."""
ITM_PAIRS_PER_FORWARD = 256
"""Image-caption pairs scored by one ITM forward during re-ranking (bounds the memory of the copied image states)."""


class RetrievalCollator:
    """Turns caption samples into a retrieval batch.

    Training samples ``{"image", "image_id", "text"}`` give one caption per image; evaluation samples
    ``{"image", "image_id", "references": [captions]}`` give every caption of the image, each a text query whose
    ground truth is that image. The batch holds ``pixel_values`` ``(B, C, H, W)``, ``input_ids`` and
    ``attention_mask`` ``(T, L)`` of the ``T`` captions, ``text_to_image`` ``(T,)`` (index of each caption's image in
    the batch) and the ``image_id`` list (``None`` where a sample has none).

    Args:
        image_processor: the model's image processor (resize, crop, normalise).
        tokenizer: the model's tokenizer.
        max_length: captions are truncated to this many tokens.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_length: int) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts: list[str] = []
        text_to_image: list[int] = []
        for index, sample in enumerate(samples):
            captions = sample["references"] if "references" in sample else [sample["text"]]
            if isinstance(captions, str) or not captions:
                raise ValueError(
                    f"`references` of image {sample.get('image_id')!r} must be a non-empty list of captions, got "
                    f"{captions!r}."
                )
            texts.extend(captions)
            text_to_image.extend([index] * len(captions))
        pixel_values = self.image_processor([sample["image"] for sample in samples], return_tensors="pt")
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "pixel_values": pixel_values["pixel_values"],
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "text_to_image": torch.tensor(text_to_image, dtype=torch.long),
            "image_id": [sample.get("image_id") for sample in samples],
        }


@dataclass
class ImageFeatures:
    """What the image tower gives for a batch of images.

    Attributes:
        embeds: L2-normalised contrastive embeddings, ``(B, D)`` (CLIP, BLIP) or ``(B, Q, D)`` (BLIP-2 queries).
        hidden: vision encoder output ``(B, N, H)`` that the ITM head cross-attends to; None without an ITM head.
    """

    embeds: Tensor
    hidden: Tensor | None


class _Towers:
    """How one model family embeds images and captions, scores their similarity and runs its ITM head."""

    has_itm = False

    def image(self, model: Any, pixel_values: Tensor) -> ImageFeatures:
        raise NotImplementedError

    def text(self, model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised caption embeddings ``(T, D)``."""
        raise NotImplementedError

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Cosine similarity ``(num_images, num_texts)``."""
        return image_embeds @ text_embeds.T

    def itm(self, model: Any, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits ``(P, 2)`` (column 1 = match) of ``P`` image-caption pairs."""
        raise NotImplementedError(f"{type(self).__name__} has no image-text matching head.")


def _vision_dtype(model: Any) -> torch.dtype:
    return next(model.vision_model.parameters()).dtype


def _pooled(output: Any) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output is projected; 4.x returns the tensor itself
    return output if isinstance(output, Tensor) else output.pooler_output


class _ClipTowers(_Towers):
    def image(self, model: CLIPModel, pixel_values: Tensor) -> ImageFeatures:
        embeds = _pooled(model.get_image_features(pixel_values=pixel_values.to(_vision_dtype(model))))
        return ImageFeatures(F.normalize(embeds, dim=-1), None)

    def text(self, model: CLIPModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(_pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)


class _BlipTowers(_Towers):
    has_itm = True

    def image(self, model: BlipForImageTextRetrieval, pixel_values: Tensor) -> ImageFeatures:
        hidden = model.vision_model(pixel_values=pixel_values.to(_vision_dtype(model))).last_hidden_state
        return ImageFeatures(F.normalize(model.vision_proj(hidden[:, 0]), dim=-1), hidden)

    def text(self, model: BlipForImageTextRetrieval, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(model.text_proj(hidden[:, 0]), dim=-1)

    def itm(
        self, model: BlipForImageTextRetrieval, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        image_mask = torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        output = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=hidden,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return model.itm_head(output[:, 0])


class _Blip2Towers(_Towers):
    has_itm = True

    def image(self, model: Blip2ForImageTextRetrieval, pixel_values: Tensor) -> ImageFeatures:
        hidden = model.vision_model(pixel_values=pixel_values.to(_vision_dtype(model))).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(hidden.shape[0], -1, -1),
            encoder_hidden_states=hidden,
            encoder_attention_mask=torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device),
        ).last_hidden_state
        embeds = model.vision_projection(queries.to(model.vision_projection.weight.dtype))
        return ImageFeatures(F.normalize(embeds, dim=-1), hidden)

    def text(self, model: Blip2ForImageTextRetrieval, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        output = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(model.text_projection(output[:, 0].to(model.text_projection.weight.dtype)), dim=-1)

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Best query per image: ``max_q <image_q, text>`` (BLIP-2's ITC), chunked over images to bound memory."""
        num_queries = image_embeds.shape[1]
        chunk = max(1, (1 << 26) // max(num_queries * text_embeds.shape[0], 1))
        return torch.cat(
            [
                torch.einsum("iqd,td->iqt", image_embeds[start : start + chunk], text_embeds).amax(dim=1)
                for start in range(0, image_embeds.shape[0], chunk)
            ]
        )

    def itm(
        self, model: Blip2ForImageTextRetrieval, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        queries = model.query_tokens.expand(hidden.shape[0], -1, -1)
        num_queries = queries.shape[1]
        query_mask = torch.ones(queries.shape[:-1], dtype=attention_mask.dtype, device=attention_mask.device)
        output = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=hidden,
            encoder_attention_mask=torch.ones(hidden.shape[:-1], dtype=torch.long, device=hidden.device),
        ).last_hidden_state
        return model.itm_head(output[:, :num_queries].to(model.itm_head.weight.dtype)).mean(dim=1)


FAMILIES: dict[str, tuple[type[PreTrainedModel], _Towers]] = {
    "clip": (CLIPModel, _ClipTowers()),
    "blip": (BlipForImageTextRetrieval, _BlipTowers()),
    "blip-2": (Blip2ForImageTextRetrieval, _Blip2Towers()),
}
"""``config.model_type`` -> (the Hugging Face retrieval class, its towers)."""


class RetrievalTask(EcoflapTask):
    """Image-text retrieval (COCO / Flickr30k Karpathy splits) with CLIP, BLIP or BLIP-2.

    The family comes from the config's ``model_type``: ``clip`` -> ``CLIPModel``, ``blip`` ->
    ``BlipForImageTextRetrieval``, ``blip-2`` -> ``Blip2ForImageTextRetrieval`` (its Q-Former config needs
    ``use_qformer_text_input: true``, as in ``Salesforce/blip2-itm-vit-g``).

    Loss (docs/algorithm.md §2, also the fine-tuning loss): CLIP's own symmetric contrastive loss
    (``return_loss=True``). BLIP / BLIP-2: symmetric InfoNCE of the ITC similarities divided by ``temperature``,
    captions of the same ``image_id`` in the batch counted as positives (as BLIP does), plus, with ``itm_loss``, the
    ITM cross-entropy on the positive pairs and one hard negative per image and per caption drawn from the ITC
    similarities (BLIP's recipe; without it the cross-attention layers get no signal). With ``self.model`` in eval
    mode (as during pruning) the negatives are drawn from a fixed-seed generator, so the loss is a deterministic
    function of the weights, which the zeroth-order estimator's ``L(θ+εz) − L(θ−εz)`` needs. Negatives come from
    this rank's batch only.

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
        check_tokenizer_source(model_config, tokenizer)
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}. HINT: BLIP starts at 0.07.")
        self.family = _family(pretrained, model_config)
        model_cls, self.towers = FAMILIES[self.family]
        self.model = build_hf_model(model_cls, pretrained, model_config)
        self.itm_top_k = _check_itm_top_k(itm_top_k, self.family, recall_at)
        self.itm_loss = itm_loss and self.towers.has_itm
        self.temperature = temperature
        self.recall_at = tuple(recall_at)
        image_processor, text_tokenizer = _processors(pretrained, tokenizer, self.family, self.model.config)
        self.collator = RetrievalCollator(
            image_processor, text_tokenizer, _max_length(max_length, text_tokenizer, self.family, self.model.config)
        )
        self.val_recall = RetrievalRecall(top_k=self.recall_at)
        self.test_recall = RetrievalRecall(top_k=self.recall_at)
        self._uses_metric = self.family != "blip-2" and self.itm_top_k == 0
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
        if self.family == "clip":
            return self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"].to(_vision_dtype(self.model)),
                return_loss=True,
            ).loss
        image = self.towers.image(self.model, batch["pixel_values"])
        text = self.towers.text(self.model, batch["input_ids"], batch["attention_mask"])
        similarity = self.towers.similarity(image.embeds, text).float()
        positives = _same_image(batch["image_id"], similarity.device)
        loss = contrastive_loss(similarity / self.temperature, positives)
        if self.itm_loss:
            assert image.hidden is not None
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
        split = _gather_split(self._split, self.itm_top_k > 0)
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

    def _rerank(self, similarity: Tensor, split: _Split) -> tuple[Tensor, Tensor]:
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

    def _itm_scores(self, split: _Split, images: Tensor, texts: Tensor) -> Tensor:
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


# -------------------------------------------------------------------- pure functions
def contrastive_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    Args:
        logits: ``(B, B)`` image-caption similarities divided by the temperature (row i = image i).
        positives: ``(B, B)`` bool, True where caption j describes image i (the diagonal at least); each row's and
            column's targets are spread uniformly over its positives.
    """
    targets = positives.float()
    image_to_text = -(F.log_softmax(logits, dim=1) * targets / targets.sum(dim=1, keepdim=True)).sum(dim=1).mean()
    text_to_image = -(F.log_softmax(logits.T, dim=1) * targets.T / targets.T.sum(dim=1, keepdim=True)).sum(dim=1)
    return (image_to_text + text_to_image.mean()) / 2


def hard_negative_pairs(
    logits: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """BLIP's ITM pairs: every positive pair, plus per image a caption and per caption an image sampled as a hard
    negative with probability ``softmax(logits)`` over the non-positives (rows without any negative get none).

    Args:
        logits: ``(B, B)`` image->caption similarities / temperature.
        positives: ``(B, B)`` bool.
        generator: random source of the draws; None uses the global one.

    Returns:
        ``(image_index, caption_index, label)``, each ``(P,)``; label 1 for a match, 0 for a negative.
    """
    size = logits.shape[0]
    index = torch.arange(size, device=logits.device)
    image_rows, caption_rows, labels = [index], [index], [torch.ones(size, dtype=torch.long, device=logits.device)]
    for weights, is_image_query in ((logits, True), (logits.T, False)):
        weights = (weights.float().softmax(dim=1) + 1e-4).masked_fill(positives if is_image_query else positives.T, 0)
        rows = torch.nonzero(weights.sum(dim=1) > 0).flatten()
        if len(rows) == 0:
            continue
        drawn = torch.multinomial(weights[rows], 1, generator=generator).flatten()
        image_rows.append(rows if is_image_query else drawn)
        caption_rows.append(drawn if is_image_query else rows)
        labels.append(torch.zeros(len(rows), dtype=torch.long, device=logits.device))
    return torch.cat(image_rows), torch.cat(caption_rows), torch.cat(labels)


# -------------------------------------------------------------------- split gathering
@dataclass
class _Split:
    """The whole evaluation split, each image once, as every rank sees it after the gather."""

    image_embeds: Tensor
    text_embeds: Tensor
    text_to_image: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    owner: Tensor  # (num_images,) rank holding each image's vision output
    local_index: Tensor  # (num_images,) row of that image in its owner's `hidden`
    hidden: Tensor | None  # this rank's vision outputs
    rank: int
    world_size: int


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(tensor: Tensor) -> list[Tensor]:
    return gather_all_tensors(tensor) if _distributed() else [tensor]


def _gather_objects(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _pad_cat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``(n_i, L_i)`` token tensors along rows, right-padding with 0 to the longest ``L``."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, length - t.shape[1])) for t in tensors])


def _gather_split(parts: list[dict[str, Any]], with_hidden: bool) -> _Split:
    rank = torch.distributed.get_rank() if _distributed() else 0
    world_size = torch.distributed.get_world_size() if _distributed() else 1
    local = {
        "image_embeds": torch.cat([p["image_embeds"] for p in parts]).float(),
        "captions_per_image": torch.cat([p["captions_per_image"] for p in parts]),
        "text_embeds": torch.cat([p["text_embeds"] for p in parts]).float(),
        "input_ids": _pad_cat([p["input_ids"] for p in parts]),
        "attention_mask": _pad_cat([p["attention_mask"] for p in parts]),
    }
    ids = [image_id for p in parts for image_id in p["image_id"]]
    gathered = {name: _gather(value) for name, value in local.items()}
    all_ids = _gather_objects(ids)
    counts = [len(rank_ids) for rank_ids in all_ids]
    flat_ids = [image_id for rank_ids in all_ids for image_id in rank_ids]
    device = local["image_embeds"].device
    keep = torch.tensor(_first_occurrences(flat_ids), dtype=torch.bool, device=device)
    owner = torch.repeat_interleave(torch.arange(world_size, device=device), torch.tensor(counts, device=device))
    local_index = torch.cat([torch.arange(n, device=device) for n in counts])
    captions = torch.cat(gathered["captions_per_image"])
    text_keep = torch.repeat_interleave(keep, captions)
    captions = captions[keep]
    return _Split(
        image_embeds=torch.cat(gathered["image_embeds"])[keep],
        text_embeds=torch.cat(gathered["text_embeds"])[text_keep],
        text_to_image=torch.repeat_interleave(torch.arange(len(captions), device=device), captions),
        input_ids=_pad_cat(gathered["input_ids"])[text_keep],
        attention_mask=_pad_cat(gathered["attention_mask"])[text_keep],
        owner=owner[keep],
        local_index=local_index[keep],
        hidden=torch.cat([p["hidden"] for p in parts]) if with_hidden else None,
        rank=rank,
        world_size=world_size,
    )


def _first_occurrences(ids: Sequence[int | str | None]) -> list[bool]:
    """Keep-mask dropping repeated image ids (a padding ``DistributedSampler`` repeats samples); None never repeats."""
    seen: set[int | str] = set()
    keep = []
    for image_id in ids:
        keep.append(image_id is None or image_id not in seen)
        if image_id is not None:
            seen.add(image_id)
    return keep


# -------------------------------------------------------------------- construction helpers
def _image_ids(ids: Sequence[Any]) -> list[int | str] | None:
    return None if any(image_id is None for image_id in ids) else list(ids)


def _same_image(ids: Sequence[Any], device: torch.device) -> Tensor:
    """``(B, B)`` bool: samples sharing an ``image_id`` (only the diagonal where ids are missing)."""
    size = len(ids)
    same = torch.eye(size, dtype=torch.bool, device=device)
    if all(image_id is not None for image_id in ids):
        same |= torch.tensor([[a == b for b in ids] for a in ids], dtype=torch.bool, device=device)
    return same


def _family(pretrained: str | None, model_config: dict[str, Any] | None) -> str:
    """The family (``config.model_type``) of the model to build, checked against what retrieval supports."""
    check_model_source(pretrained, model_config, "Salesforce/blip-itm-base-coco")
    config = AutoConfig.from_pretrained(pretrained).to_dict() if pretrained is not None else dict(model_config or {})
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"The retrieval model's `model_type` must be one of {tuple(FAMILIES)}, got {model_type!r}. HINT: a "
            "model_config dict needs its model_type (config.to_dict() includes it)."
        )
    if model_type == "blip-2" and not (config.get("qformer_config") or {}).get("use_qformer_text_input", False):
        raise ValueError(
            "BLIP-2 retrieval needs `qformer_config.use_qformer_text_input` true (the Q-Former encodes the captions), "
            "got false. HINT: use Salesforce/blip2-itm-vit-g or set use_qformer_text_input: true in qformer_config."
        )
    return model_type


def _check_itm_top_k(itm_top_k: int | None, family: str, recall_at: Sequence[int]) -> int:
    has_itm = FAMILIES[family][1].has_itm
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


def _processors(pretrained: str | None, tokenizer: str | None, family: str, config: Any) -> tuple[Any, Any]:
    """(image processor, tokenizer) of the model: its own processor, or built for a config-only model."""
    if pretrained is not None:
        processor = AutoProcessor.from_pretrained(pretrained)
        text_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else processor.tokenizer
        return processor.image_processor, text_tokenizer
    check_tokenizer_source(config, tokenizer)
    size = config.vision_config.image_size
    if family == "clip":
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        image_processor = BlipImageProcessor(size={"height": size, "width": size})
    return image_processor, load_tokenizer(tokenizer)


def _max_length(max_length: int | None, tokenizer: Any, family: str, config: Any) -> int:
    text_config = config.qformer_config if family == "blip-2" else config.text_config
    positions = text_config.max_position_embeddings
    if max_length is None:
        return min(tokenizer.model_max_length, positions)
    if not 1 <= max_length <= positions:
        raise ValueError(
            f"`max_length` must be in [1, {positions}] (the text position embeddings), got {max_length!r}. HINT: "
            "BLIP uses 35."
        )
    return max_length


__all__ = ["RetrievalCollator", "RetrievalTask", "contrastive_loss", "hard_negative_pairs", "FAMILIES"]
