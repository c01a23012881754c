"""Tiny models of the processor-encoded families with a calibration batch and loss from their own task.

A plain module (not ``conftest``) imported by name: the tests of ``models/`` build the same cases.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ecoflap_pl.models.tiny import tiny_processor
from ecoflap_pl.tasks import RetrievalTask, VQATask
from ecoflap_pl.tasks.base import EcoflapTask

GENERATIVE = ("llava", "qwen2_vl", "qwen2_5_vl", "instructblip", "paligemma")
CORPUS = ["what color is the bus?", "how many cats are there?", "red two yes", "a dog runs on the grass"] * 3


def samples() -> list[dict[str, Any]]:
    """Three annotated VQA samples (with captions, so retrieval reads them too) on images of different sizes."""
    images = [
        Image.new("RGB", (32, 32), (200, 30, 30)),
        Image.new("RGB", (48, 32), (30, 200, 30)),
        Image.new("RGB", (40, 56), (30, 30, 200)),
    ]
    questions, answers = CORPUS[:3], ("red", "two", "yes")
    return [
        {
            "image": image,
            "image_id": i,
            "question_id": i,
            "question": questions[i],
            "answers": [answers[i]] * 10,
            "answer_type": "other",
            "answer": answers[i],
            "text": CORPUS[3],
        }
        for i, image in enumerate(images)
    ]


def family_task(family: str, seed: int = 0, **task_kwargs: Any) -> EcoflapTask:
    """The family's task on a tiny random model: VQA for the generators, retrieval for SigLIP."""
    config, processor = tiny_processor(family, CORPUS, layers=2)
    folder = tempfile.mkdtemp(prefix=f"tokenizer_{family}_")
    processor.tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    if family == "siglip":
        return RetrievalTask(model_config=config.to_dict(), tokenizer=folder, **task_kwargs)
    return VQATask(model_config=config.to_dict(), tokenizer=folder, num_beams=1, max_new_tokens=2, **task_kwargs)


def family_case(family: str) -> tuple[torch.nn.Module, list[dict[str, Any]], Callable[[Any, Any], torch.Tensor]]:
    """``(model, batches, loss_fn(model, batch))`` of a tiny model of ``family``."""
    task = family_task(family)
    batches = [task.collator(samples()[:2]), task.collator(samples()[1:])]
    return task.model, batches, lambda model, batch: task.calibration_loss(batch)
