"""Visual question answering: BLIP-2 zero-shot and BLIP (generated answers), ViLT (answer classification)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_info
from transformers import PretrainedConfig
from typing_extensions import override

from ecoflap_pl.metrics import ANSWER_TYPES, VQAAccuracy, write_vqa_results
from ecoflap_pl.tasks.distributed import any_rank, gather_objects
from ecoflap_pl.tasks.families import TaskKind, serving
from ecoflap_pl.tasks.generation import PromptedGenerationTask
from ecoflap_pl.tasks.vqa_heads import VQAContext, VQAHead

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = {family.architecture: family.prompts["vqa"] for family in serving("vqa")}
"""Each family's default VQA prompt (ECoFLaP's BLIP-2 zero-shot prompt; BLIP and ViLT read the bare question)."""
METADATA_KEYS = ("question_id", "image_id", "question", "answers", "answer_type", "answer")


class VQACollator:
    """Turns VQA sample dicts into a batch.

    Every batch holds the model inputs of the family's :class:`~ecoflap_pl.tasks.vqa_heads.VQAHead` and the metadata
    lists ``question_id``, ``image_id``, ``question``, ``answers``, ``answer_type``, ``answer``. The loss inputs are
    added when every sample is annotated (a non-empty ``answer`` or ``answers``; test splits have neither).

    Args:
        head: the family's VQA head.
        prompt: format string of the question, with one ``{}``.
    """

    def __init__(self, head: VQAHead, prompt: str) -> None:
        self.head = head
        self.prompt = prompt

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("`samples` must hold at least one sample, got an empty list.")
        questions = [self.prompt.format(sample["question"]) for sample in samples]
        annotated = all(sample.get("answer") or sample.get("answers") for sample in samples)
        batch = self.head.encode(samples, questions, annotated)
        for key in METADATA_KEYS:
            batch[key] = [sample.get(key) for sample in samples]
        return batch


class VQATask(PromptedGenerationTask):
    """Visual question answering with BLIP-2 (zero-shot, generated answers), BLIP (``BlipForQuestionAnswering``,
    generated answers), ViLT (``ViltForQuestionAnswering``, classification over its answer vocabulary), or a
    generative family (generated answers): LLaVA (``LlavaForConditionalGeneration``), Qwen2-VL / Qwen2.5-VL (chat
    template), InstructBLIP, PaliGemma (``"answer en {}"``).

    Loss (``calibration_loss`` and ``training_step``): BLIP-2 and the generative families: the LM loss of the
    sample's most common answer given the prompt (decoder-only: prompt, image tokens and padding masked out;
    FlanT5: prompt in the encoder, answer in the decoder); BLIP: its own answer-decoder loss; ViLT: its own BCE
    against the soft scores ``min(1, count / 3)``.
    Validation and test: beam-search answers (BLIP-2, BLIP; the prompt cut off and the text stripped) or the
    top-scoring answer (ViLT), scored with :class:`~ecoflap_pl.metrics.VQAAccuracy` (a repeated ``question_id``
    counts once, so DDP's padding repeats drop out) and logged as ``val/accuracy``, ``val/accuracy_yes_no``,
    ``val/accuracy_number``, ``val/accuracy_other`` (``test/...``).
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

    task_kind: ClassVar[TaskKind] = "vqa"
    labels_hint = "every sample needs its `answer` / `answers` (test splits have none)."
    head: VQAHead

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
        super().__init__(
            pretrained=pretrained,
            model_config=model_config,
            tokenizer=tokenizer,
            architecture=architecture,
            prompt=prompt,
            max_text_length=max_text_length,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            from_pretrained_kwargs=from_pretrained_kwargs,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
        )
        self.head.prepare_model(self.model)
        self.collator = VQACollator(self.head, self.prompt)
        self.results_dir = results_dir
        self.results_paths: dict[str, Path] = {}
        self.val_accuracy = VQAAccuracy()
        self.test_accuracy = VQAAccuracy()
        self._unanswered: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}
        log.info("VQATask: %s (%s), prompt %r", self.architecture, self.family, self.prompt)

    @property
    def answer_list(self) -> list[str] | None:
        """The answer vocabulary of a classifier (ViLT) in label order; None for generated answers."""
        return self.head.answer_list

    @override
    def check_prompt(self, prompt: str) -> None:
        if prompt.count("{}") != 1:
            raise ValueError(
                f"`prompt` must hold exactly one '{{}}' for the question, got {prompt!r}. HINT: e.g. "
                "'Question: {} Short answer:'."
            )
        super().check_prompt(prompt)

    @override
    def _prepare(self, config: PretrainedConfig) -> None:
        """Build the family's VQA head (a classifier fixes its answer vocabulary in ``config``)."""
        hparams = self.hparams
        context = VQAContext(
            self.processor, config, hparams["max_text_length"], hparams["answer_list"], self.generate_texts
        )
        self.head = self.family_adapter.vqa_head(context)

    def answer(self, batch: dict[str, Any]) -> list[str]:
        """The model's answer to every question of ``batch``."""
        return self.head.answer(self.model, batch, self.generation_kwargs)

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
                question_ids=[batch["question_id"][i] for i in scored],
            )
        self._unanswered[stage].extend(
            (int(batch["question_id"][i]), predictions[i]) for i in range(len(predictions)) if not batch["answers"][i]
        )

    def _finish(self, metric: VQAAccuracy, stage: str) -> None:
        pending, self._unanswered[stage] = self._unanswered[stage], []
        if self.trainer.sanity_checking:
            metric.reset()
            return
        if any_rank(metric.update_count > 0):  # compute() gathers from every rank: all of them, or none
            for key, value in metric.compute().items():
                self.log(f"{stage}/{key}", value, prog_bar=key == "accuracy")
            metric.reset()
        if any_rank(bool(pending)):
            self._write_results(pending, stage)

    def _write_results(self, pending: list[tuple[int, str]], stage: str) -> None:
        pending = [item for part in gather_objects(pending) for item in part]
        folder = self.results_dir or self.trainer.log_dir or self.trainer.default_root_dir
        path = Path(folder) / f"vqa_{stage}_results.json"
        if self.trainer.is_global_zero:
            write_vqa_results(path, [q for q, _ in pending], [a for _, a in pending])
            rank_zero_info(
                f"{stage}: {len(pending)} questions have no answers in the annotations (no accuracy for them); their "
                f"predictions were written to {path} (the official results format for the evaluation server)."
            )
        self.results_paths[stage] = path
