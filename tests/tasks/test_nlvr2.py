"""NLVR2Task: ViLT with two images, its batch layout, loss, fine-tuning step, accuracy and predictions."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import train_tokenizer
from ecoflap_pl.tasks.nlvr2 import NLVR2Task
from tests.tasks.task_helpers import fit_changed_weights, validate_once_twice_and_on_two_processes

SENTENCES = ["the left image has two dogs", "there is a cat in the right image", "one image shows a red bus"]


@pytest.fixture(scope="module")
def vilt_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("vilt_tokenizer")
    train_tokenizer(SENTENCES * 4, vocab_size=128, template="cls_sep").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def task(vilt_tokenizer_dir: str) -> NLVR2Task:
    torch.manual_seed(0)
    return NLVR2Task(model_config=tiny_config("vilt").to_dict(), tokenizer=vilt_tokenizer_dir, learning_rate=1e-3)


def _samples(n: int = 4) -> list[dict]:
    samples = []
    for i in range(n):
        size = (32, 32) if i % 2 == 0 else (40, 32)
        left = Image.new("RGB", size, (40 * i % 256, 10, 200))
        right = Image.new("RGB", (32, 32), (10, 30 * i % 256, 90))
        samples.append(
            {"images": [left, right], "identifier": f"dev-{i}-0-0", "sentence": SENTENCES[i % 3], "label": i % 2}
        )
    return samples


def test_collator_stacks_the_two_images_of_each_sample(task: NLVR2Task) -> None:
    batch = task.collator(_samples(3))
    batch_size, num_images, channels, height, width = batch["pixel_values"].shape
    assert (batch_size, num_images, channels) == (3, 2, 3)
    assert height == 32 and width == 40  # padded to the widest image of the batch
    assert batch["pixel_mask"].shape == (3, 2, height, width)
    assert batch["pixel_mask"][0, 0, :, 32:].sum() == 0 and batch["pixel_mask"][1, 0].all()
    assert batch["labels"].tolist() == [0, 1, 0]
    assert batch["identifier"] == ["dev-0-0-0", "dev-1-0-0", "dev-2-0-0"]
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"][:, 0].eq(5).all()  # [CLS]
    assert pickle.loads(pickle.dumps(task.collator))(_samples(1))["pixel_values"].shape[:2] == (1, 2)


def test_collator_rejects_a_sample_without_two_images(task: NLVR2Task) -> None:
    sample = _samples(1)[0]
    sample["images"] = sample["images"][:1]
    with pytest.raises(ValueError, match="must hold 2 images"):
        task.collator([sample])


def test_calibration_loss_is_the_models_cross_entropy(task: NLVR2Task) -> None:
    batch = task.collator(_samples())
    loss = task.calibration_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    task.model.eval()
    with torch.no_grad():
        logits = task(batch).logits
        expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
        assert torch.allclose(task.calibration_loss(batch), expected, atol=1e-6)


def test_training_changes_weights_and_validation_logs_accuracy(
    vilt_tokenizer_dir: str, trainer_factory: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    task = NLVR2Task(model_config=tiny_config("vilt").to_dict(), tokenizer=vilt_tokenizer_dir, learning_rate=1e-2)
    samples, trainer = _samples(4), trainer_factory()
    changed = fit_changed_weights(task, trainer, samples)
    loader = DataLoader(samples, batch_size=2, collate_fn=task.collator)
    assert "classifier.3.weight" in changed and any("encoder.layer" in name for name in changed)
    trainer.save_checkpoint(tmp_path / "nlvr2.ckpt")
    restored = NLVR2Task.load_from_checkpoint(tmp_path / "nlvr2.ckpt")
    with torch.no_grad():
        batch = task.collator(_samples(2))
        # ViLT draws a random patch order (multinomial): equal up to float summation order
        assert torch.allclose(restored.eval()(batch).logits, task.eval()(batch).logits, atol=1e-5)
    (metrics,) = trainer.validate(task, dataloaders=loader, verbose=False)
    assert set(metrics) == {"val/accuracy", "val/loss"}
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    task.model.eval()
    with torch.no_grad():
        correct = sum(
            (task(b).logits.argmax(-1) == b["labels"]).sum().item() for b in map(task.collator, (_samples(4),))
        )
    assert metrics["val/accuracy"] == pytest.approx(correct / 4)
    with torch.no_grad():  # the per-sample cross-entropy averages to the model's own loss of each batch
        model_losses = [float(task(task.collator(samples[i : i + 2])).loss) for i in (0, 2)]
    assert metrics["val/loss"] == pytest.approx(sum(model_losses) / 2, rel=1e-5)
    (test_metrics,) = trainer.test(task, dataloaders=loader, verbose=False)
    assert test_metrics["test/accuracy"] == pytest.approx(correct / 4)


@pytest.mark.distributed
def test_accuracy_under_two_process_ddp_equals_one_process(
    task: NLVR2Task, trainer_factory: Callable[..., pl.Trainer]
) -> None:
    """5 samples on 2 ranks: the DistributedSampler repeats dev-0-0-0 on rank 1, which counts once."""
    samples = _samples(5)
    task.model.eval()
    with torch.no_grad():
        predicted = task(task.collator(samples)).logits.argmax(-1).tolist()
    # labels from the model's own predictions: sample 0 right, 3 of 5 right
    for sample, prediction, right in zip(samples, predicted, (True, False, True, False, True), strict=True):
        sample["label"] = prediction if right else 1 - prediction
    single, repeat_counted, distributed = validate_once_twice_and_on_two_processes(
        task, samples, "identifier", trainer_factory
    )
    assert single["val/accuracy"] == pytest.approx(3 / 5)
    assert repeat_counted["val/accuracy"] == pytest.approx(4 / 6)
    assert distributed["val/accuracy"] == single["val/accuracy"]
    # the mean of per-rank batch means that Lightning's sync_dist gave counted dev-0-0-0 again: the repeat-counted loss
    assert repeat_counted["val/loss"] != pytest.approx(single["val/loss"], rel=1e-3)
    assert distributed["val/loss"] == pytest.approx(single["val/loss"], rel=1e-6)


def test_predict_step_returns_one_prediction_per_identifier(task: NLVR2Task) -> None:
    task.model.eval()
    with torch.no_grad():
        predictions = task.predict_step(task.collator(_samples(2)), 0)
    assert [p["identifier"] for p in predictions] == ["dev-0-0-0", "dev-1-0-0"]
    assert all(isinstance(p["prediction"], bool) and 0.0 <= p["probability"] <= 1.0 for p in predictions)


def test_model_config_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="`tokenizer` must be given with `model_config`"):
        NLVR2Task(model_config=tiny_config("vilt").to_dict())


def test_config_with_one_image_is_rejected(vilt_tokenizer_dir: str) -> None:
    config = tiny_config("vilt").to_dict() | {"num_images": 1}
    with pytest.raises(ValueError, match="`num_images` must be 2"):
        NLVR2Task(model_config=config, tokenizer=vilt_tokenizer_dir)
