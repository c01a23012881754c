"""How a family answers visual questions: the batch it reads and how it turns the model's output into answers.

- :class:`GeneratedAnswers`: a prompted generator (BLIP-2, LLaVA, Qwen-VL, InstructBLIP, PaliGemma) generates the
  answer after the formatted prompt; its loss is the LM loss of the most common answer.
- :class:`BlipAnswerDecoder`: ``BlipForQuestionAnswering`` encodes the question with the image and decodes the
  answer; its loss is the answer decoder's.
- :class:`AnswerClassifier`: ``ViltForQuestionAnswering`` scores a fixed answer vocabulary; its loss is a BCE
  against the soft scores of :func:`soft_scores`.

A family's adapter picks its head (:meth:`~ecoflap_pl.tasks.families.FamilyAdapter.vqa_head`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, ProcessorMixin
from typing_extensions import override

from ecoflap_pl.metrics import normalize_answer
from ecoflap_pl.tasks.labels import IGNORE_INDEX
from ecoflap_pl.tasks.prompt_encoder import PromptEncoding

Generator = Callable[..., list[str]]
"""``generator(model, batch, **generation_kwargs)`` -> the new text of every row
(:class:`~ecoflap_pl.tasks.generation.TextGenerator`)."""


@dataclass(frozen=True)
class VQAContext:
    """What a family's adapter builds its VQA head from.

    Attributes:
        processor: the model's processor.
        config: the model's config (a classifier fixes its answer vocabulary in it).
        max_length: text tokens kept per question / answer.
        answer_list: a classifier's answer vocabulary; None: the config's.
        generator: generates text from a prompt batch.
    """

    processor: ProcessorMixin
    config: PretrainedConfig
    max_length: int
    answer_list: list[str] | None
    generator: Generator


def soft_scores(answers: list[str], label2id: dict[str, int]) -> dict[int, float]:
    """VQA target of one question: ``min(1, count / 3)`` for each vocabulary answer among the human answers.

    Answers are normalised as the official evaluation does before they are looked up (raw answers are tried too);
    answers outside the vocabulary are dropped.
    """
    counts: Counter[int] = Counter()
    for answer in answers:
        label = label2id.get(normalize_answer(answer), label2id.get(answer))
        if label is not None:
            counts[label] += 1
    return {label: min(1.0, count / 3) for label, count in counts.items()}


def main_answer(sample: dict[str, Any]) -> str:
    """The sample's ``answer`` (the most common human answer), else the most common of its ``answers``."""
    if sample.get("answer"):
        return str(sample["answer"])
    return str(Counter(sample["answers"]).most_common(1)[0][0])


class VQAHead:
    """The batch of a family's VQA model and its answers (see the module docstring).

    Attributes:
        answer_list: the answer vocabulary of a classifier, in label order; None for the generating heads.
    """

    answer_list: list[str] | None = None

    def encode(self, samples: list[dict[str, Any]], questions: list[str], annotated: bool) -> dict[str, Any]:
        """The model inputs of ``samples`` whose formatted questions are ``questions``, with the loss inputs when
        ``annotated``."""
        raise NotImplementedError

    def answer(self, model: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]) -> list[str]:
        """The model's answer to every question of ``batch``."""
        raise NotImplementedError

    def prepare_model(self, model: Any) -> None:
        """Adjust the model once it is built (nothing by default)."""


class GeneratedAnswers(VQAHead):
    """A prompted generator: ``prompt_*`` generation inputs of the formatted question (always) and, annotated, the
    LM loss inputs of the sample's most common answer after the question (a space between them).

    Args:
        encoder: the family's prompt encoder.
        generator: generates the answers from the prompt batch.
    """

    def __init__(self, encoder: PromptEncoding, generator: Generator) -> None:
        self.encoder = encoder
        self.generator = generator

    @override
    def encode(self, samples: list[dict[str, Any]], questions: list[str], annotated: bool) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if annotated:
            prompts = [question if question[-1:].isspace() else question + " " for question in questions]
            batch.update(self.encoder.loss_batch(samples, prompts, [main_answer(sample) for sample in samples]))
        batch.update(self.encoder.prompt_batch(samples, questions))
        return batch

    @override
    def answer(self, model: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]) -> list[str]:
        return self.generator(model, batch, **generation_kwargs)


class BlipAnswerDecoder(VQAHead):
    """BLIP's question encoder and answer decoder: ``input_ids`` / ``attention_mask`` of the question (right padded,
    always) and, annotated, ``decoder_input_ids`` (the answer, first token = decoder BOS), ``decoder_attention_mask``
    and ``labels`` (padding ``-100``).

    Args:
        processor: the model's processor.
        max_length: text tokens kept per question / answer.
        decoder_bos_token_id: the answer decoder's start token.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int, decoder_bos_token_id: int) -> None:
        self.processor = processor
        self.max_length = max_length
        self.decoder_bos_token_id = decoder_bos_token_id

    @override
    def encode(self, samples: list[dict[str, Any]], questions: list[str], annotated: bool) -> dict[str, Any]:
        tokenizer: Any = self.processor.tokenizer
        image_processor: Any = self.processor.image_processor
        batch: dict[str, Any] = {
            "pixel_values": image_processor([sample["image"] for sample in samples], return_tensors="pt")[
                "pixel_values"
            ]
        }
        text = tokenizer(
            questions,
            padding="longest",
            padding_side="right",  # blip_generate trims each question to its length
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch["input_ids"], batch["attention_mask"] = text["input_ids"], text["attention_mask"]
        if annotated:
            answers = tokenizer(
                [main_answer(sample) for sample in samples],
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            decoder_ids = answers["input_ids"].clone()
            decoder_ids[:, 0] = self.decoder_bos_token_id
            batch["decoder_input_ids"] = decoder_ids
            batch["decoder_attention_mask"] = answers["attention_mask"]
            batch["labels"] = decoder_ids.masked_fill(answers["attention_mask"] == 0, IGNORE_INDEX)
        return batch

    @override
    def answer(self, model: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]) -> list[str]:
        output = [ids.tolist() for ids in blip_generate(model, batch, **generation_kwargs)]
        tokenizer: Any = self.processor.tokenizer
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


class AnswerClassifier(VQAHead):
    """ViLT's answer classifier: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_mask`` (always) and,
    annotated, ``labels`` ``(B, num_answers)``, the soft scores of :func:`soft_scores`.

    Building the head fixes the answer vocabulary in ``config`` (``id2label`` / ``label2id``).

    Args:
        processor: the model's processor.
        config: the model's config; its ``id2label`` is the vocabulary when ``answer_list`` is None.
        max_length: text tokens kept per question, at most the text position embeddings.
        answer_list: the answer vocabulary in label order.

    Raises:
        ValueError: an ``answer_list`` of the wrong size or with repeats, or no vocabulary at all.
    """

    def __init__(
        self, processor: ProcessorMixin, config: PretrainedConfig, max_length: int, answer_list: list[str] | None
    ) -> None:
        self.processor = processor
        self.vocabulary = answer_vocabulary(answer_list, config)
        self.answer_list = self.vocabulary
        config.id2label = dict(enumerate(self.vocabulary))
        config.label2id = {answer: i for i, answer in enumerate(self.vocabulary)}
        self.label2id = dict(config.label2id)
        self.max_length = min(max_length, config.max_position_embeddings)

    @override
    def prepare_model(self, model: Any) -> None:
        """Name the model's outputs after the vocabulary."""
        model.config.label2id = dict(self.label2id)
        model.config.id2label = {i: answer for answer, i in self.label2id.items()}

    @override
    def encode(self, samples: list[dict[str, Any]], questions: list[str], annotated: bool) -> dict[str, Any]:
        image_processor: Any = self.processor.image_processor
        tokenizer: Any = self.processor.tokenizer
        pixels = image_processor([sample["image"] for sample in samples], return_tensors="pt")
        text = tokenizer(questions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        batch: dict[str, Any] = {"pixel_values": pixels["pixel_values"]}
        pixel_mask = pixels.get("pixel_mask")
        if pixel_mask is None:
            shape = pixels["pixel_values"].shape
            pixel_mask = torch.ones(shape[0], *shape[2:], dtype=torch.long)
        batch["pixel_mask"] = pixel_mask
        batch.update({key: text[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in text})
        if annotated:
            labels = torch.zeros(len(samples), len(self.label2id))
            for row, sample in enumerate(samples):
                for label, score in soft_scores(sample.get("answers") or [sample["answer"]], self.label2id).items():
                    labels[row, label] = score
            batch["labels"] = labels
        return batch

    @override
    def answer(self, model: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]) -> list[str]:
        inputs = {key: value for key, value in batch.items() if key in _CLASSIFIER_INPUTS}
        with torch.no_grad():
            logits = model(**inputs).logits
        return [self.vocabulary[int(i)] for i in logits.argmax(dim=-1)]


_CLASSIFIER_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")


def answer_vocabulary(answer_list: list[str] | None, config: PretrainedConfig) -> list[str]:
    """``answer_list`` checked against the classifier's size, else the config's ``id2label`` in label order."""
    if answer_list is not None:
        if len(answer_list) != config.num_labels:
            raise ValueError(
                f"`answer_list` must hold one answer per classifier output ({config.num_labels}), got "
                f"{len(answer_list)}. HINT: leave it unset to use the model's id2label."
            )
        if len(set(answer_list)) != len(answer_list):
            raise ValueError("`answer_list` must not repeat answers.")
        return list(answer_list)
    id2label: dict[Any, str] = dict(config.id2label or {})
    answers = [id2label[i] for i in range(len(id2label))]  # num_labels is len(id2label)
    if all(answer == f"LABEL_{i}" for i, answer in enumerate(answers)):
        raise ValueError(
            "ViLT VQA needs an answer vocabulary, got the config's placeholder labels LABEL_0... HINT: set "
            "`answer_list`, or the config's id2label."
        )
    return answers


@torch.no_grad()
def blip_generate(model: Any, batch: dict[str, Any], **generation_kwargs: Any) -> list[torch.Tensor]:
    """``BlipForQuestionAnswering.generate`` run on groups of questions of one length, without padding.

    The answer decoder of ``BlipForQuestionAnswering`` cannot ignore the question's padding:
    ``BlipForQuestionAnswering.generate`` hands it an all-ones question mask, and in transformers 5.x BLIP's text
    cross-attention drops ``encoder_attention_mask`` altogether. A question's answer would then depend on the
    longest question of its batch; generating each length group unpadded keeps answers independent of batching.

    Returns:
        The generated ids of each row (without the decoder start token).
    """
    lengths = batch["attention_mask"].sum(dim=1)
    answers: dict[int, torch.Tensor] = {}
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().flatten()
        output = model.generate(
            input_ids=batch["input_ids"][rows, :length],
            pixel_values=batch["pixel_values"][rows],
            attention_mask=batch["attention_mask"][rows, :length],
            **generation_kwargs,
        )
        for row, ids in zip(rows.tolist(), output, strict=True):
            answers[row] = ids[1:]
    return [answers[row] for row in range(len(lengths))]
