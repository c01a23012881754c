"""Shared fixtures of the task tests: offline tokenizers, tiny PIL images, raw sample dicts.

The sample dicts are those of docs/data_formats.md, Sample dicts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ecoflap_pl.models.loading import load_tokenizer
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import train_tokenizer
from tests.trainers import quiet_trainer

CAPTIONS = (
    "a dog runs on the green grass",
    "a red bus parked near the street",
    "two cats sleeping on a couch",
    "a man riding a horse on the beach",
)
QUESTIONS = ("what color is the bus?", "how many cats are there?", "is the dog running?")
ANSWERS = ("red", "blue", "two", "one", "yes", "no")
PROMPTS = ("a photo of", "a picture of", "Question: Short answer:")
CORPUS = CAPTIONS + QUESTIONS + ANSWERS + PROMPTS
"""Everything the task tests tokenize."""
TEMPLATES = {"blip2_opt": "bos", "blip2_t5": "eos", "blip": "cls_sep", "vilt": "cls_sep", "clip": "bos_eos"}
"""Tiny model family -> how its tokenizer wraps a sequence."""


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tokenizer_dir(template)``: a directory holding a tokenizer trained on :data:`CORPUS` (cached per template:
    ``"bos"`` for OPT, ``"eos"`` for T5, ``"cls_sep"`` for BLIP and ViLT)."""
    made: dict[str, str] = {}

    def make(template: str) -> str:
        if template not in made:
            path = tmp_path_factory.mktemp(f"tokenizer_{template}")
            train_tokenizer(list(CORPUS) * 3, vocab_size=160, template=template).save_pretrained(path)
            made[template] = str(path)
        return made[template]

    return make


@pytest.fixture(scope="session")
def tiny_setup(tokenizer_dir: Callable[[str], str]) -> Callable[..., tuple[dict[str, Any], str]]:
    """``tiny_setup(family, **tiny_config_overrides)``: ``(config dict, tokenizer dir)`` of a tiny model whose
    vocabulary fits the family's tokenizer."""

    def make(family: str, **overrides: Any) -> tuple[dict[str, Any], str]:
        path = tokenizer_dir(TEMPLATES[family])
        return tiny_config(family, vocab_size=len(load_tokenizer(path)), **overrides).to_dict(), path

    return make


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three small RGB images of different sizes and colours."""
    return [
        Image.new("RGB", (32, 32), (200, 30, 30)),
        Image.new("RGB", (40, 32), (30, 200, 30)),
        Image.new("RGB", (36, 44), (30, 30, 200)),
    ]


@pytest.fixture
def caption_train_samples(images: list[Image.Image]) -> list[dict]:
    """Caption training samples ``{"image", "image_id", "text"}``."""
    return [{"image": image, "image_id": i, "text": CAPTIONS[i]} for i, image in enumerate(images)]


@pytest.fixture
def caption_eval_samples(images: list[Image.Image]) -> list[dict]:
    """Caption evaluation samples ``{"image", "image_id", "references"}``."""
    return [
        {"image": image, "image_id": i, "references": [CAPTIONS[i], CAPTIONS[(i + 1) % len(CAPTIONS)]]}
        for i, image in enumerate(images)
    ]


@pytest.fixture
def vqa_samples(images: list[Image.Image]) -> list[dict]:
    """Annotated VQA samples (train / val): 10 human answers, answer type, most common answer."""
    answers = (["red"] * 7 + ["blue"] * 3, ["two"] * 9 + ["one"], ["yes"] * 10)
    types = ("other", "number", "yes/no")
    return [
        {
            "image": image,
            "image_id": 100 + i,
            "question_id": 1000 + i,
            "question": QUESTIONS[i],
            "answers": answers[i],
            "answer_type": types[i],
            "answer": answers[i][0],
        }
        for i, image in enumerate(images)
    ]


@pytest.fixture
def vqa_test_samples(vqa_samples: list[dict]) -> list[dict]:
    """The VQA samples as a test split has them: no answers, no answer type."""
    return [{**sample, "answers": [], "answer_type": "", "answer": ""} for sample in vqa_samples]


def cpu_trainer(**kwargs) -> pl.Trainer:  # noqa: ANN003
    """A quiet CPU trainer for task tests (2 steps, no sanity check; see :func:`~tests.trainers.quiet_trainer`)."""
    return quiet_trainer(**{"max_steps": 2, "num_sanity_val_steps": 0, **kwargs})


@pytest.fixture
def trainer_factory(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """``trainer_factory(**overrides)``: see :func:`cpu_trainer`; files (reports, results) go to ``tmp_path``."""
    return functools.partial(cpu_trainer, default_root_dir=tmp_path)


class SampleDataModule(pl.LightningDataModule):
    """A DataModule over in-memory raw samples with the contract's ``calibration_dataloader`` (first samples of
    ``train``) and the task's collator, for tests that run the pruning callback on a task."""

    def __init__(self, train: list[dict], val: list[dict], batch_size: int = 2) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def _loader(self, samples: list[dict]) -> DataLoader:
        return DataLoader(samples, batch_size=self.batch_size, collate_fn=self.trainer.lightning_module.collator)

    def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader:
        return self._loader(self.train[:num_samples])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)

    test_dataloader = predict_dataloader = val_dataloader


@pytest.fixture
def datamodule_factory() -> Callable[..., SampleDataModule]:
    """``datamodule_factory(train_samples, val_samples, batch_size=2)``: see :class:`SampleDataModule`."""
    return SampleDataModule
