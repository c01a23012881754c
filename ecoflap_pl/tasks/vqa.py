"""Visual question answering: BLIP-2 zero-shot and BLIP (generated answers), ViLT (answer classification)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    Blip2ForConditionalGeneration,
    BlipForQuestionAnswering,
    PretrainedConfig,
    ProcessorMixin,
    ViltForQuestionAnswering,
)
from typing_extensions import override

from ecoflap_pl.metrics import ANSWER_TYPES, VQAAccuracy, normalize_answer, write_vqa_results
from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.models.loading import build_hf_model, placement_kwargs
from ecoflap_pl.tasks._processor_prompts import ProcessorPromptEncoder
from ecoflap_pl.tasks._vision_language import (
    IGNORE_INDEX,
    PromptEncoder,
    build_processor,
    check_generation,
    check_image_placeholder,
    family_of,
    generate_texts,
    load_config,
    loss_inputs,
    resolve_architecture,
    search_kwargs,
    stop_token_ids,
)
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)

MODEL_CLASSES = {
    "blip2": Blip2ForConditionalGeneration,
    "blip": BlipForQuestionAnswering,
    "vilt": ViltForQuestionAnswering,
    **{name: family.model_class for name, family in GENERATIVE_FAMILIES.items()},
}
DEFAULT_PROMPTS = {
    "blip2": "Question: {} Short answer:",
    "blip": "{}",
    "vilt": "{}",
    **{name: family.vqa_prompt for name, family in GENERATIVE_FAMILIES.items()},
}
"""ECoFLaP's BLIP-2 zero-shot VQA prompt; BLIP and ViLT read the bare question; the generative families' own."""
DEFAULT_LENGTH_PENALTIES = {"blip2": -1.0, "blip": 1.0, "vilt": 1.0}
"""LAVIS's BLIP-2 ``predict_answers`` favours short answers; the others generate with the usual 1.0."""
METADATA_KEYS = ("question_id", "image_id", "question", "answers", "answer_type", "answer")


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


class VQACollator:
    """Turns VQA sample dicts into a batch.

    Every batch holds ``pixel_values`` and the metadata lists ``question_id``, ``image_id``, ``question``,
    ``answers``, ``answer_type``, ``answer``. The loss inputs are added when every sample is annotated (a non-empty
    ``answer`` or ``answers``; test splits have neither):

    - BLIP-2 (``blip2_opt`` / ``blip2_t5``) and the generative families (LLaVA, Qwen-VL, InstructBLIP,
      PaliGemma): ``prompt_input_ids`` / ``prompt_attention_mask`` (and the processor's other ``prompt_*`` inputs)
      of the formatted prompt (always), and ``input_ids`` / ``attention_mask`` / ``labels`` for the LM loss of the
      sample's most common ``answer`` after the prompt (:class:`PromptEncoder`, :class:`ProcessorPromptEncoder`).
    - BLIP (``BlipForQuestionAnswering``): ``input_ids`` / ``attention_mask`` of the question (right padded,
      always), and
      ``decoder_input_ids`` (the answer, first token = decoder BOS), ``decoder_attention_mask`` and ``labels``
      (padding ``-100``).
    - ViLT: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_mask`` (always), and ``labels``
      ``(B, num_answers)``, the soft scores of :func:`soft_scores`.

    Args:
        processor: the model's processor.
        family: ``blip2_opt``, ``blip2_t5``, ``blip``, ``vilt`` or a generative family's name.
        prompt: format string of the question, with one ``{}``.
        max_length: text tokens kept per question / answer.
        encoder: the :class:`PromptEncoder` of a BLIP-2 model, the :class:`ProcessorPromptEncoder` of a generative
            family.
        decoder_bos_token_id: BLIP's answer decoder start token.
        label2id: ViLT's answer vocabulary.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        family: str,
        prompt: str,
        max_length: int,
        encoder: PromptEncoder | ProcessorPromptEncoder | None = None,
        decoder_bos_token_id: int | None = None,
        label2id: dict[str, int] | None = None,
    ) -> None:
        self.processor = processor
        self.family = family
        self.prompt = prompt
        self.max_length = max_length
        self.encoder = encoder
        self.decoder_bos_token_id = decoder_bos_token_id
        self.label2id = label2id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("`samples` must hold at least one sample, got an empty list.")
        questions = [self.prompt.format(sample["question"]) for sample in samples]
        annotated = all(sample.get("answer") or sample.get("answers") for sample in samples)
        if self.family == "vilt":
            batch = self._vilt(questions, samples, annotated)
        elif self.family == "blip":
            batch = self._blip(questions, samples, annotated)
        else:
            batch = self._prompted(questions, samples, annotated)
        for key in METADATA_KEYS:
            batch[key] = [sample.get(key) for sample in samples]
        return batch

    def _prompted(self, questions: list[str], samples: list[dict], annotated: bool) -> dict[str, Any]:
        assert self.encoder is not None
        batch: dict[str, Any] = {}
        if annotated:
            prompts = [question if question[-1:].isspace() else question + " " for question in questions]
            batch.update(self.encoder.loss_batch(samples, prompts, [_main_answer(sample) for sample in samples]))
        batch.update(self.encoder.prompt_batch(samples, questions))
        return batch

    def _blip(self, questions: list[str], samples: list[dict], annotated: bool) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        batch: dict[str, Any] = {
            "pixel_values": self.processor.image_processor(
                [sample["image"] for sample in samples], return_tensors="pt"
            )["pixel_values"]
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
                [_main_answer(sample) for sample in samples],
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

    def _vilt(self, questions: list[str], samples: list[dict], annotated: bool) -> dict[str, Any]:
        assert self.label2id is not None
        pixels = self.processor.image_processor([sample["image"] for sample in samples], return_tensors="pt")
        text = self.processor.tokenizer(
            questions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
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


def _main_answer(sample: dict[str, Any]) -> str:
    """The sample's ``answer`` (the most common human answer), else the most common of its ``answers``."""
    if sample.get("answer"):
        return sample["answer"]
    return Counter(sample["answers"]).most_common(1)[0][0]


class VQATask(EcoflapTask):
    """Visual question answering with BLIP-2 (zero-shot, generated answers), BLIP (``BlipForQuestionAnswering``,
    generated answers), ViLT (``ViltForQuestionAnswering``, classification over its answer vocabulary), or a
    generative family (generated answers): LLaVA (``LlavaForConditionalGeneration``), Qwen2-VL / Qwen2.5-VL (chat
    template), InstructBLIP, PaliGemma (``"answer en {}"``).

    Loss (``calibration_loss`` and ``training_step``): BLIP-2 and the generative families: the LM loss of the
    sample's most common answer given the prompt (decoder-only: prompt, image tokens and padding masked out;
    FlanT5: prompt in the encoder, answer in the decoder); BLIP: its own answer-decoder loss; ViLT: its own BCE
    against the soft scores ``min(1, count / 3)``.
    Validation and test: beam-search answers (BLIP-2, BLIP; the prompt cut off and the text stripped) or the
    top-scoring answer (ViLT), scored with :class:`~ecoflap_pl.metrics.VQAAccuracy` and logged as
    ``val/accuracy``, ``val/accuracy_yes_no``, ``val/accuracy_number``, ``val/accuracy_other`` (``test/...``).
    Questions without answers (test-dev / test splits) are not scored: their answers are gathered from every rank
    and rank 0 writes the official results file ``[{"question_id", "answer"}]`` to
    ``<results_dir>/vqa_<stage>_results.json``. ``predict_step`` returns ``[{"question_id", "answer"}]``.

    Args:
        pretrained: a ``from_pretrained`` name or directory (``Salesforce/blip2-flan-t5-xl``,
            ``Salesforce/blip-vqa-base``, ``dandelin/vilt-b32-finetuned-vqa``, ``llava-hf/llava-1.5-7b-hf``,
            ``Qwen/Qwen2.5-VL-7B-Instruct``, ``Salesforce/instructblip-flan-t5-xl``, ``google/paligemma-3b-pt-224``);
            its processor is loaded with ``AutoProcessor``.
        model_config: a config as a dict, for a random-initialised model (ViLT: its ``id2label`` is the answer
            vocabulary).
        tokenizer: a saved tokenizer directory; required with ``model_config``, optional with ``pretrained`` (not
            for the generative families, whose processors expand image tokens with their own tokenizer).
        architecture: ``"blip2"``, ``"blip"``, ``"vilt"`` or a generative family (``"llava"``, ``"qwen2_vl"``,
            ``"qwen2_5_vl"``, ``"instructblip"``, ``"paligemma"``); None infers it from the config's ``model_type``.
        prompt: format string of the question with one ``{}``; None: ``"Question: {} Short answer:"`` for BLIP-2
            and InstructBLIP, ``"USER: <image>\\n{} ASSISTANT:"`` for LLaVA, ``"answer en {}"`` for PaliGemma, the
            user turn ``"{} Answer the question using a single word or phrase."`` for Qwen-VL (the chat template
            wraps it), the bare question otherwise.
        answer_list: ViLT's answer vocabulary in label order; None: the config's ``id2label``.
        max_text_length: text tokens kept per question / answer (ViLT: at most its position embeddings).
        num_beams: beam width of answer generation.
        max_new_tokens: longest answer generated, in tokens.
        min_new_tokens: shortest answer generated, in tokens.
        length_penalty: beam-search length penalty; None: -1.0 for BLIP-2 (LAVIS), 1.0 otherwise.
        results_dir: folder of the results files of unannotated splits; None: the trainer's ``log_dir`` (or
            ``default_root_dir`` without a logger).
        from_pretrained_kwargs: extra ``from_pretrained`` arguments (``dtype``, ``revision``, ...).
        device_map: Accelerate's big-model placement of a ``pretrained`` model: ``"auto"`` (fill the GPUs, then the
            CPU, then disk), ``"balanced"``, or a dict module name -> device (``0``, ``"cpu"``, ``"disk"``). The model
            stays where it is placed: pruning runs each block on the device that holds it and loads offloaded
            weights one block at a time; the report records the placement.
        max_memory: the most each device may hold with ``device_map``, e.g. ``{0: "70GiB", "cpu": "200GiB"}``.
        offload_folder: where weights offloaded to disk (and their pruned versions) are written.
        learning_rate: AdamW peak learning rate (BLIP VQA fine-tuning: 2e-5).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        architecture: str | None = None,
        prompt: str | None = None,
        answer_list: list[str] | None = None,
        max_text_length: int = 32,
        num_beams: int = 5,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        length_penalty: float | None = None,
        results_dir: str | None = None,
        from_pretrained_kwargs: dict[str, Any] | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[str, Any] | None = None,
        offload_folder: str | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        check_generation(num_beams, max_new_tokens, min_new_tokens, max_text_length)
        config = load_config(pretrained, model_config, architecture)
        self.architecture = resolve_architecture(architecture, config, tuple(MODEL_CLASSES))
        self.family = "vilt" if self.architecture == "vilt" else family_of(self.architecture, config)
        self.prompt = DEFAULT_PROMPTS[self.architecture] if prompt is None else prompt
        if self.prompt.count("{}") != 1:
            raise ValueError(
                f"`prompt` must hold exactly one '{{}}' for the question, got {self.prompt!r}. HINT: e.g. "
                "'Question: {} Short answer:'."
            )
        check_image_placeholder(self.architecture, self.prompt)
        if self.architecture == "vilt":
            self.answer_list = _answer_vocabulary(answer_list, config)
            config.id2label = dict(enumerate(self.answer_list))
            config.label2id = {answer: i for i, answer in enumerate(self.answer_list)}
            max_text_length = min(max_text_length, config.max_position_embeddings)
        self.processor = build_processor(self.architecture, config, pretrained, tokenizer)
        self.model = build_hf_model(
            MODEL_CLASSES[self.architecture],
            pretrained,
            None if pretrained is not None else config,
            **placement_kwargs(device_map, max_memory, offload_folder),
            **(from_pretrained_kwargs or {}),
        ).eval()  # as from_pretrained leaves it; EcoflapTask.on_fit_start switches to training mode
        if self.architecture == "vilt":
            self.model.config.id2label, self.model.config.label2id = config.id2label, config.label2id
        self.collator = _collator(self.processor, self.family, self.prompt, max_text_length, config)
        if length_penalty is None:
            length_penalty = DEFAULT_LENGTH_PENALTIES.get(self.architecture, 1.0)
        self.generation_kwargs: dict[str, Any] = {
            **search_kwargs(num_beams, length_penalty),
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
        }
        eos = stop_token_ids(self.family, self.processor.tokenizer, config)
        if eos is not None:
            self.generation_kwargs["eos_token_id"] = eos
        self.results_dir = results_dir
        self.results_paths: dict[str, Path] = {}
        self.val_accuracy = VQAAccuracy()
        self.test_accuracy = VQAAccuracy()
        self._unanswered: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}
        log.info("VQATask: %s (%s), prompt %r", self.architecture, self.family, self.prompt)

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's own loss on a batch of annotated questions (``labels`` from the collator)."""
        if "labels" not in batch:
            raise ValueError(
                "VQA calibration and training batches must carry `labels`, got none. HINT: every sample needs its "
                "`answer` / `answers` (test splits have none)."
            )
        return self.model(**loss_inputs(batch)).loss

    def answer(self, batch: dict[str, Any]) -> list[str]:
        """The model's answer to every question of ``batch``."""
        if self.family == "vilt":
            inputs = {key: value for key, value in loss_inputs(batch).items() if key != "labels"}
            with torch.no_grad():
                logits = self.model(**inputs).logits
            return [self.answer_list[int(i)] for i in logits.argmax(dim=-1)]
        if self.family == "blip":
            output = [ids.tolist() for ids in blip_generate(self.model, batch, **self.generation_kwargs)]
            return [text.strip() for text in self.processor.tokenizer.batch_decode(output, skip_special_tokens=True)]
        return generate_texts(self.model, self.family, self.processor.tokenizer, batch, **self.generation_kwargs)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        self._finish(self.val_accuracy, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self._finish(self.test_accuracy, "test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        answers = self.answer(batch)
        return [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers, strict=True)]

    def _evaluate(self, batch: dict[str, Any], metric: VQAAccuracy, stage: str) -> None:
        predictions = self.answer(batch)
        scored = [i for i, answers in enumerate(batch["answers"]) if answers]
        if scored:
            types = [batch["answer_type"][i] for i in scored]
            metric.update(
                [predictions[i] for i in scored],
                [batch["answers"][i] for i in scored],
                answer_types=types if all(t in ANSWER_TYPES for t in types) else None,
            )
        self._unanswered[stage].extend(
            (int(batch["question_id"][i]), predictions[i]) for i in range(len(predictions)) if not batch["answers"][i]
        )

    def _finish(self, metric: VQAAccuracy, stage: str) -> None:
        pending, self._unanswered[stage] = self._unanswered[stage], []
        if self.trainer.sanity_checking:
            metric.reset()
            return
        if metric.update_count > 0:
            for key, value in metric.compute().items():
                self.log(f"{stage}/{key}", value, prog_bar=key == "accuracy")
            metric.reset()
        if _any_rank(bool(pending)):
            self._write_results(pending, stage)

    def _write_results(self, pending: list[tuple[int, str]], stage: str) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[tuple[int, str]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pending)
            pending = [item for part in gathered for item in part or []]
        folder = self.results_dir or self.trainer.log_dir or self.trainer.default_root_dir
        path = Path(folder) / f"vqa_{stage}_results.json"
        if self.trainer.is_global_zero:
            write_vqa_results(path, [q for q, _ in pending], [a for _, a in pending])
            rank_zero_info(
                f"{stage}: {len(pending)} questions have no answers in the annotations (no accuracy for them); their "
                f"predictions were written to {path} (the official results format for the evaluation server)."
            )
        self.results_paths[stage] = path


def _any_rank(flag: bool) -> bool:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags: list[bool | None] = [None] * dist.get_world_size()
        dist.all_gather_object(flags, flag)
        return any(flags)
    return flag


def _answer_vocabulary(answer_list: list[str] | None, config: PretrainedConfig) -> list[str]:
    if answer_list is not None:
        if len(answer_list) != config.num_labels:
            raise ValueError(
                f"`answer_list` must hold one answer per classifier output ({config.num_labels}), got "
                f"{len(answer_list)}. HINT: leave it unset to use the model's id2label."
            )
        if len(set(answer_list)) != len(answer_list):
            raise ValueError("`answer_list` must not repeat answers.")
        return list(answer_list)
    answers = [config.id2label[i] for i in range(config.num_labels)]
    if all(answer == f"LABEL_{i}" for i, answer in enumerate(answers)):
        raise ValueError(
            "ViLT VQA needs an answer vocabulary, got the config's placeholder labels LABEL_0... HINT: set "
            "`answer_list`, or the config's id2label."
        )
    return answers


def _collator(
    processor: ProcessorMixin, family: str, prompt: str, max_length: int, config: PretrainedConfig
) -> VQACollator:
    if family == "vilt":
        return VQACollator(processor, family, prompt, max_length, label2id=dict(config.label2id))
    if family == "blip":
        return VQACollator(processor, family, prompt, max_length, decoder_bos_token_id=config.text_config.bos_token_id)
    if family in GENERATIVE_FAMILIES:
        encoder = ProcessorPromptEncoder(processor, GENERATIVE_FAMILIES[family], config, max_length)
        return VQACollator(processor, family, prompt, max_length, encoder=encoder)
    encoder = PromptEncoder(
        processor,
        family,
        max_length=max_length,
        num_query_tokens=config.num_query_tokens,
        image_token_id=config.image_token_id,
    )
    return VQACollator(processor, family, prompt, max_length, encoder=encoder)


@torch.no_grad()
def blip_generate(
    model: BlipForQuestionAnswering, batch: dict[str, Any], **generation_kwargs: Any
) -> list[torch.Tensor]:
    """``BlipForQuestionAnswering.generate`` run on groups of questions of one length, without padding.

    The answer decoder of ``BlipForQuestionAnswering`` cannot ignore the question's padding:
    ``BlipForQuestionAnswering.generate`` hands it an all-ones question mask, and in transformers 5.x BLIP's text
    cross-attention drops ``encoder_attention_mask`` altogether. A question's answer would then depend on the
    longest question of its batch; generating each length group unpadded keeps answers independent of batching.

    Returns:
        The generated ids of each row (without the decoder start token).
    """
    lengths = batch["attention_mask"].sum(dim=1)
    answers: list[torch.Tensor | None] = [None] * len(lengths)
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
    return answers  # type: ignore[return-value]
