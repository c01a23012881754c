"""ClassificationTask (timm ViT / EVA) and ZeroShotClassificationTask (CLIP): transforms, losses, training, top-1/5."""

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
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ecoflap_pl.datamodules import ImageNetDataModule
from ecoflap_pl.export import write_pruned_model
from ecoflap_pl.models.tiny import TIMM_ARCHITECTURES, tiny_config
from ecoflap_pl.models.tokenizers import train_tokenizer
from ecoflap_pl.tasks.classification import ClassificationTask
from ecoflap_pl.tasks.zero_shot import ZeroShotClassificationTask
from tests.datamodules.datamodule_layouts import write_imagenet
from tests.tasks.task_helpers import fit_changed_weights, validate_once_twice_and_on_two_processes

CLASS_NAMES = ["tench", "goldfish", "great white shark"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


def _timm_config(num_classes: int = 3) -> dict[str, Any]:
    return {"num_classes": num_classes, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("clip_tokenizer")
    corpus = [template.format(name) for name in CLASS_NAMES + ["cat", "dog"] for template in TEMPLATES]
    train_tokenizer(corpus * 3, vocab_size=128, template="bos_eos").save_pretrained(path)
    return str(path)


def _timm_task(family: str = "vit", **kwargs: Any) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(timm_model=TIMM_ARCHITECTURES[family], model_config=_timm_config(), **kwargs)


def _clip_task(tokenizer: str, **kwargs: Any) -> ZeroShotClassificationTask:
    torch.manual_seed(0)
    kwargs = {"class_names": CLASS_NAMES, "templates": TEMPLATES} | kwargs
    return ZeroShotClassificationTask(model_config=tiny_config("clip").to_dict(), tokenizer=tokenizer, **kwargs)


def _samples(n: int = 6) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [
        {"image": Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)), "label": i % 3}
        for i in range(n)
    ]


class _ClassesData(pl.LightningDataModule):
    """A DataModule exposing ``class_names``, as ImageNetDataModule does."""

    def __init__(self, collate_fn: Any) -> None:
        super().__init__()
        self.class_names = list(CLASS_NAMES)
        self.collate_fn = collate_fn

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_samples(4), batch_size=2, collate_fn=self.collate_fn)


# ------------------------------------------------------------------ transforms and collator
@pytest.mark.parametrize("family", ["vit", "eva"])
def test_collator_uses_the_timm_eval_transform_at_the_models_size(family: str) -> None:
    task = _timm_task(family)
    assert task.data_config["input_size"] == (3, 32, 32)
    batch = pickle.loads(pickle.dumps(task.collator))(_samples(2))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 1]
    pixels = task.normalize(batch["pixel_values"])
    mean = torch.tensor(task.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(task.data_config["std"]).view(1, 3, 1, 1)
    assert torch.allclose(pixels, (batch["pixel_values"] / 255 - mean) / std)


def test_clip_preprocessing_is_resize_and_center_crop_with_clip_statistics(clip_tokenizer_dir: str) -> None:
    task = _clip_task(clip_tokenizer_dir)
    assert task.data_config["input_size"] == (3, 32, 32) and task.data_config["crop_pct"] == 1.0
    assert task.data_config["interpolation"] == "bicubic"
    assert task.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("family", ["vit", "eva"])
def test_timm_loss_is_the_classifier_cross_entropy(family: str) -> None:
    task = _timm_task(family)
    batch = task.collator(_samples(4))
    loss = task.calibration_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    with torch.no_grad():
        expected = F.cross_entropy(task.model(task.normalize(batch["pixel_values"])), batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)


def test_clip_class_embeddings_average_the_prompts_of_each_class_name(clip_tokenizer_dir: str) -> None:
    task = _clip_task(clip_tokenizer_dir)
    tokenizer = task.tokenizer
    expected = []
    with torch.no_grad():
        for name in CLASS_NAMES:
            tokens = tokenizer([t.format(name) for t in TEMPLATES], padding=True, return_tensors="pt")
            text = task.model.get_text_features(**tokens).pooler_output
            expected.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
        assert torch.allclose(task.class_embeddings(), torch.stack(expected), atol=1e-5)
        task.set_class_names(list(reversed(CLASS_NAMES)))
        assert torch.allclose(task.class_embeddings(), torch.stack(expected[::-1]), atol=1e-5)


def test_clip_zero_shot_loss_is_the_cross_entropy_of_its_logits(clip_tokenizer_dir: str) -> None:
    task = _clip_task(clip_tokenizer_dir)
    batch = task.collator(_samples(4))
    loss = task.calibration_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert task.model.text_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0  # text tower in the loss
    with torch.no_grad():
        image = task.model.get_image_features(pixel_values=task.normalize(batch["pixel_values"])).pooler_output
        logits = task.model.logit_scale.exp() * F.normalize(image, dim=-1) @ task.class_embeddings().T
        assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), abs=1e-5)


# ------------------------------------------------------------------ Trainer
def test_timm_training_changes_weights_and_validation_logs_top1_top5(
    trainer_factory: Callable[..., pl.Trainer],
) -> None:
    task = _timm_task("eva", learning_rate=1e-2)
    trainer = trainer_factory()
    changed = fit_changed_weights(task, trainer, _samples(4))
    assert {"head.weight", "blocks.0.attn.qkv.weight"} <= changed
    (metrics,) = trainer.validate(task, dataloaders=DataLoader(_samples(6), batch_size=4, collate_fn=task.collator))
    assert set(metrics) == {"val/top1", "val/top5", "val/loss"}
    batch = task.collator(_samples(6))
    with torch.no_grad():
        logits = task(batch["pixel_values"])
    assert metrics["val/top1"] == pytest.approx(float((logits.argmax(-1) == batch["labels"]).float().mean()))
    assert metrics["val/top5"] == 1.0  # 3 classes: top-5 is capped at top-3
    # batches of 4 and 2: the mean over the 6 samples, as the batch-size-weighted mean of batch means was
    assert metrics["val/loss"] == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), rel=1e-6)


@pytest.mark.distributed
def test_top1_top5_under_two_process_ddp_equal_one_process(trainer_factory: Callable[..., pl.Trainer]) -> None:
    """5 images on 2 ranks: the DistributedSampler repeats image 0 on rank 1, which counts once."""
    torch.manual_seed(0)
    task = ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], model_config=_timm_config(num_classes=8))
    samples = [{**sample, "image_id": f"n01440764/{i}.JPEG"} for i, sample in enumerate(_samples(5))]
    with torch.no_grad():
        order = task.eval()(task.collator(samples)["pixel_values"]).argsort(dim=-1, descending=True)
    # labels from the model's own ranking: image 0 a top-1 hit; 2 of 5 top-1 hits, 3 of 5 top-5 hits
    for sample, row, rank in zip(samples, order.tolist(), (0, 7, 1, 7, 0), strict=True):
        sample["label"] = row[rank]
    single, repeat_counted, distributed = validate_once_twice_and_on_two_processes(
        task, samples, "image_id", trainer_factory
    )
    assert (single["val/top1"], single["val/top5"]) == (pytest.approx(2 / 5), pytest.approx(3 / 5))
    assert (repeat_counted["val/top1"], repeat_counted["val/top5"]) == (pytest.approx(3 / 6), pytest.approx(4 / 6))
    assert (distributed["val/top1"], distributed["val/top5"]) == (single["val/top1"], single["val/top5"])
    # the mean of per-rank batch means that Lightning's sync_dist gave counted image 0 again: the repeat-counted loss
    assert repeat_counted["val/loss"] != pytest.approx(single["val/loss"], rel=1e-3)
    assert distributed["val/loss"] == pytest.approx(single["val/loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("gradient_clip_val", "precision", "fused"),
    [
        (None, "32-true", True),
        (0.5, "32-true", True),
        (0.5, "16-true", True),
        (None, "bf16-mixed", True),
        (0.5, "bf16-mixed", None),
    ],
)
def test_adamw_is_fused_unless_gradients_are_clipped_under_mixed_precision(
    trainer_factory: Callable[..., pl.Trainer], gradient_clip_val: float | None, precision: str, fused: bool | None
) -> None:
    # Lightning refuses to clip gradients under mixed precision with an optimizer that unscales them itself
    task = _timm_task("eva")
    trainer = trainer_factory(gradient_clip_val=gradient_clip_val, precision=precision, max_steps=1)
    trainer.fit(task, train_dataloaders=DataLoader(_samples(2), batch_size=2, collate_fn=task.collator))
    assert trainer.optimizers[0].defaults["fused"] is fused


def test_clip_text_tower_learns_only_when_in_the_loss(
    clip_tokenizer_dir: str, trainer_factory: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    for in_loss in (True, False):
        task = _clip_task(clip_tokenizer_dir, text_tower_in_loss=in_loss, learning_rate=1e-2)
        text = task.model.text_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
        vision = task.model.vision_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
        trainer = trainer_factory()
        trainer.fit(task, train_dataloaders=DataLoader(_samples(4), batch_size=2, collate_fn=task.collator))
        assert not torch.equal(task.model.vision_model.encoder.layers[0].mlp.fc1.weight, vision)
        assert torch.equal(task.model.text_model.encoder.layers[0].mlp.fc1.weight, text) != in_loss
    trainer.save_checkpoint(tmp_path / "classification.ckpt")
    restored = ZeroShotClassificationTask.load_from_checkpoint(tmp_path / "classification.ckpt")
    assert restored.class_names == CLASS_NAMES and restored.templates == tuple(TEMPLATES)
    assert not restored.text_tower_in_loss
    pixels = task.collator(_samples(2))["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(restored.eval()(pixels), task.eval()(pixels))


def test_clip_takes_class_names_from_the_datamodule_and_embeds_them_once_per_epoch(
    clip_tokenizer_dir: str, trainer_factory: Callable[..., pl.Trainer]
) -> None:
    task = _clip_task(clip_tokenizer_dir, class_names=None)
    assert task.class_names is None
    calls = []
    task.model.text_model.register_forward_hook(lambda *args: calls.append(1))
    (metrics,) = trainer_factory().validate(task, datamodule=_ClassesData(task.collator), verbose=False)
    assert task.class_names == CLASS_NAMES
    assert len(calls) == 1  # 2 batches, class prompts embedded once
    assert set(metrics) == {"val/top1", "val/top5", "val/loss"}
    (metrics,) = trainer_factory().test(
        task, dataloaders=DataLoader(_samples(4), batch_size=2, collate_fn=task.collator)
    )
    assert set(metrics) == {"test/top1", "test/top5", "test/loss"}


def test_predict_step_returns_top_classes(clip_tokenizer_dir: str) -> None:
    task = _clip_task(clip_tokenizer_dir)
    with torch.no_grad():
        out = task.predict_step(task.collator(_samples(2)), 0)
    assert out["top5"].shape == (2, 3) and torch.equal(out["prediction"], out["top5"][:, 0])
    assert torch.all(out["scores"][:, :-1] >= out["scores"][:, 1:])


# ------------------------------------------------------------------ errors
def test_clip_without_class_names_anywhere_is_rejected(
    clip_tokenizer_dir: str, trainer_factory: Callable[..., pl.Trainer]
) -> None:
    task = _clip_task(clip_tokenizer_dir, class_names=None)
    loader = DataLoader(_samples(2), batch_size=2, collate_fn=task.collator)
    with pytest.raises(ValueError, match="needs `class_names`"):
        trainer_factory().validate(task, dataloaders=loader, verbose=False)


def test_a_datamodule_with_another_number_of_classes_is_refused(
    clip_tokenizer_dir: str, trainer_factory: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    # Two wnid folders (an ImageNet subset, as Imagenette) under a 3-class classifier: label 1 is the data's second
    # wnid, not the classifier's class 1; top-1 and the loss were computed and logged as if it were.
    write_imagenet(tmp_path)
    data = ImageNetDataModule(tmp_path, batch_size=2)
    for task, hint in (
        (_timm_task("vit"), r"give it a head of 2 classes \(model_config: \{num_classes: 2\}\)"),
        (_clip_task(clip_tokenizer_dir), r"leave `class_names` out to take the DataModule's"),
    ):
        message = rf"classifier has 3 classes, but ImageNetDataModule has 2 \(n01440764, n01443537\): .*HINT: .*{hint}"
        with pytest.raises(ValueError, match=message):
            trainer_factory().validate(task, datamodule=data, verbose=False)
    torch.manual_seed(0)
    task = ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], model_config=_timm_config(num_classes=2))
    (metrics,) = trainer_factory().validate(task, datamodule=data, verbose=False)
    assert set(metrics) == {"val/top1", "val/top5", "val/loss"}


def test_timm_pretrained_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`pretrained` must be a bool with `timm_model`"):
        ClassificationTask(timm_model="vit_base_patch16_224", pretrained="openai/clip-vit-base-patch16")


def test_clip_pretrained_must_be_a_name(clip_tokenizer_dir: str) -> None:
    with pytest.raises(ValueError, match="`pretrained` must be a CLIP from_pretrained name"):
        ZeroShotClassificationTask(pretrained=True, tokenizer=clip_tokenizer_dir)


def test_templates_need_a_placeholder(clip_tokenizer_dir: str) -> None:
    with pytest.raises(ValueError, match="`templates` must be a non-empty list of strings with one"):
        _clip_task(clip_tokenizer_dir, templates=["a photo"])


def test_timm_class_names_must_match_the_classifier() -> None:
    assert _timm_task("vit", class_names=CLASS_NAMES).class_names == CLASS_NAMES
    with pytest.raises(ValueError, match="`class_names` must name the classifier's 3 classes, got 2 names"):
        _timm_task("vit", class_names=CLASS_NAMES[:2])


@pytest.mark.parametrize("family", ["vit", "eva"])
def test_timm_loads_a_local_checkpoint_whole_including_its_classifier(family: str, tmp_path: Path) -> None:
    """timm would drop a 3-class head as "not the hub's 1000 classes"; a local file's head is the model's own."""

    trained = _timm_task(family)
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.add_(1.0)
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, tmp_path / "model.safetensors")
    config = _timm_config() | {"pretrained_cfg_overlay": {"file": str(tmp_path / "model.safetensors")}}
    loaded = ClassificationTask(timm_model=TIMM_ARCHITECTURES[family], pretrained=True, model_config=config)
    for name, tensor in trained.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_timm_loads_the_model_file_of_a_save_to_folder_in_any_format(tmp_path: Path, save_format: str) -> None:
    """A sparse-bitmask `model.safetensors` given as the local checkpoint failed in timm's load_state_dict, listing
    every `.compressed` / `.bitmask` tensor as unexpected and every pruned weight as missing."""
    pruned = _timm_task("vit")
    masks = {}
    for name, parameter in pruned.model.named_parameters():
        if name.startswith("blocks.") and name.endswith(".weight") and parameter.ndim == 2:
            masks[name] = torch.rand(parameter.shape, generator=torch.Generator().manual_seed(0)) > 0.5
            parameter.data.mul_(masks[name])
    write_pruned_model(pruned.model, tmp_path, masks, save_format)
    config = _timm_config() | {"pretrained_cfg_overlay": {"file": str(tmp_path / "model.safetensors")}}
    loaded = ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], pretrained=True, model_config=config)
    for name, tensor in pruned.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("pretrained", [False, None])
def test_a_local_file_without_pretrained_is_refused(tmp_path: Path, pretrained: bool | None) -> None:
    """timm loads `pretrained_cfg_overlay.file` only with pretrained weights: without them the model started from
    random weights without a word (and the pruning callback took the saved masks beside the file for its own)."""
    save_file(
        {k: v.contiguous() for k, v in _timm_task("vit").model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    config = _timm_config() | {"pretrained_cfg_overlay": {"file": str(tmp_path / "model.safetensors")}}
    with pytest.raises(
        ValueError, match=r"timm loads that file only with pretrained weights.*HINT: set pretrained: true"
    ):
        ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], pretrained=pretrained, model_config=config)


def test_a_local_file_named_from_the_home_folder_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pretrained_cfg_overlay: {file: ~/model.safetensors}` in a config file, which no shell expands (before: timm's
    bare `FileNotFoundError` with no message)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    trained = _timm_task("vit")
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, tmp_path / "model.safetensors")
    config = _timm_config() | {"pretrained_cfg_overlay": {"file": "~/model.safetensors"}}
    loaded = ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], pretrained=True, model_config=config)
    assert loaded.model.pretrained_cfg["file"] == str(tmp_path / "model.safetensors")
    for name, tensor in trained.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", ["missing.safetensors", "."])
def test_a_local_file_that_is_not_a_file_is_named(tmp_path: Path, name: str) -> None:
    """A missing file (or the `save_to` folder instead of its model.safetensors) ended in timm's `FileNotFoundError`
    with no message and no path."""
    config = _timm_config() | {"pretrained_cfg_overlay": {"file": str(tmp_path / name)}}
    with pytest.raises(FileNotFoundError, match=r"pretrained_cfg_overlay.file.*is not a file\. HINT: name the"):
        ClassificationTask(timm_model=TIMM_ARCHITECTURES["vit"], pretrained=True, model_config=config)
