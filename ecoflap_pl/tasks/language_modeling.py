"""Language modelling with FlanT5 (prefix-LM) and LLaMA-family decoders (causal LM): loss and perplexity."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from ecoflap_pl.metrics import TokenPerplexity
from ecoflap_pl.models.loading import check_tokenizer_source, expand_home, load_pretrained, load_tokenizer
from ecoflap_pl.tasks.base import EcoflapTask
from ecoflap_pl.tasks.labels import IGNORE_INDEX, prefix_split
from ecoflap_pl.tasks.model_config import load_config

log = logging.getLogger(__name__)

# the batch key of the sample ids (TextDataModule's document index): the metric's, never the model's input
TEXT_ID = "text_id"


class TextCollator:
    """Turns ``{"text", "text_id"}`` samples into an LM batch.

    Causal models: ``input_ids``, ``attention_mask`` and ``labels`` = the ids with padding at ``-100`` (the model
    shifts them). Encoder-decoder models: the prefix-LM split of docs/algorithm.md §2 (:func:`prefix_split`): the
    prefix is the encoder input, the rest the ``labels``. The batch also carries ``text_id``, a list with each sample's
    id (None for a sample without one), which evaluation counts once; it never reaches the model.

    Args:
        tokenizer: the model's tokenizer (a pad token is required; LLaMA's EOS serves when it has none).
        max_length: tokens kept per sequence.
        encoder_decoder: use the prefix-LM split.
        prefix_lm_seed: seed of the split positions.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, encoder_decoder: bool, prefix_lm_seed: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.prefix_lm_seed = prefix_lm_seed

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, max_length=self.max_length, truncation=True, padding="longest", return_tensors="pt"
        ).data

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [sample["text"] for sample in samples]
        if self.encoder_decoder:
            prefixes, rests = zip(*(prefix_split(text, self.prefix_lm_seed) for text in texts), strict=True)
            batch = self._encode(list(prefixes))
            target = self._encode(list(rests))
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
        else:
            batch = self._encode(texts)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        batch.pop("token_type_ids", None)
        return {**batch, "labels": labels, TEXT_ID: [sample.get(TEXT_ID) for sample in samples]}


class LanguageModelingTask(EcoflapTask):
    """Language modelling: a causal decoder (LLaMA, OPT, ...) or an encoder-decoder (FlanT5, T5).

    Loss (``calibration_loss``, ``training_step``): the model's own LM loss on the collator's labels. Validation and
    test: perplexity over every target token of the split (:class:`~ecoflap_pl.metrics.TokenPerplexity`, torchmetrics'
    ``Perplexity`` with a document that DDP's sampler repeats counted once, by its ``text_id``), logged as
    ``val/perplexity`` / ``test/perplexity``.

    Args:
        pretrained: a ``from_pretrained`` name or directory (``google/flan-t5-xl``, ``huggyllama/llama-7b``).
        model_config: a config dict with its ``model_type`` (``"t5"``, ``"llama"``), for a random-initialised model.
        tokenizer: a saved tokenizer directory; required with ``model_config``; default with ``pretrained``: its own.
        max_length: tokens kept per document.
        prefix_lm_seed: seed of the encoder-decoder prefix split.
        from_pretrained_kwargs: extra ``from_pretrained`` arguments (``dtype``, ``revision``, ...).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        max_length: int = 512,
        prefix_lm_seed: int = 0,
        from_pretrained_kwargs: dict[str, Any] | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        pretrained, tokenizer = expand_home(pretrained), expand_home(tokenizer)
        if max_length < 2:
            raise ValueError(f"`max_length` must be >= 2, got {max_length!r}.")
        config = load_config(pretrained, model_config)
        check_tokenizer_source(model_config, tokenizer)
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else str(pretrained))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # LLaMA ships without a pad token
        self.encoder_decoder = bool(config.is_encoder_decoder)
        model_cls = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        if pretrained is not None:
            # an Auto class's from_pretrained returns the PreTrainedModel it resolves to
            auto_cls = cast("type[PreTrainedModel]", model_cls)
            self.model = load_pretrained(auto_cls, pretrained, **(from_pretrained_kwargs or {}))
        else:
            self.model = model_cls.from_config(config)
        self.collator = TextCollator(self.tokenizer, max_length, self.encoder_decoder, prefix_lm_seed)
        self.val_perplexity = TokenPerplexity(ignore_index=IGNORE_INDEX)
        self.test_perplexity = TokenPerplexity(ignore_index=IGNORE_INDEX)
        log.info("LanguageModelingTask: %s (%s)", config.model_type, "prefix-LM" if self.encoder_decoder else "causal")

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own LM loss on the collator's ``labels``."""
        return self.model(**_model_inputs(batch)).loss

    def _update_perplexity(self, metric: TokenPerplexity, batch: dict[str, Any]) -> None:
        logits = self.model(**_model_inputs(batch)).logits
        labels = batch["labels"]
        if not self.encoder_decoder:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        metric.update(logits, labels, ids=batch.get(TEXT_ID))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_perplexity(self.val_perplexity, batch)
        self.log("val/perplexity", self.val_perplexity, batch_size=batch["labels"].shape[0])

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._update_perplexity(self.test_perplexity, batch)
        self.log("test/perplexity", self.test_perplexity, batch_size=batch["labels"].shape[0])


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its sample ids, which the model's forward does not take."""
    return {key: value for key, value in batch.items() if key != TEXT_ID}
