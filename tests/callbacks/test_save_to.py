"""`save_to` with a tiny Hugging Face LLaMA (and its tokenizer): loads back with from_pretrained, zeros in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from huggingface_hub import ModelCard
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.callbacks import export as callback_export
from ecoflap_pl.cli import EcoflapTrainer
from ecoflap_pl.export import atomic, load_pruned_model
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.tasks.base import EcoflapTask
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask
from tests.trainers import quiet_trainer

VOCAB = ["<pad>", "</s>", "<unk>", "<s>", "a", "cat", "dog", "on", "the", "mat", "sits", "runs"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class TinyLlamaTask(EcoflapTask):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model("llama", vocab_size=len(VOCAB), hidden_size=32, layers=2)
        self.tokenizer = tiny_tokenizer()

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.calibration_loss(batch)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.calibration_loss(batch), batch_size=batch["input_ids"].shape[0])


class Sentences(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        tokenizer = tiny_tokenizer()
        texts = ["the cat sits on the mat", "a dog runs on the mat", "the dog sits", "a cat runs"] * 4
        ids = tokenizer(texts, padding="max_length", max_length=8, return_tensors="pt")["input_ids"]
        self.samples = [{"input_ids": row} for row in ids]

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples[:4], batch_size=4)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.samples[:4], batch_size=4)

    def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader:
        return DataLoader(self.samples[: num_samples or len(self.samples)], batch_size=4)


def validate(task: pl.LightningModule, data: pl.LightningDataModule, callback: ECoFLaPPruning, root: Path) -> None:
    quiet_trainer(default_root_dir=root, callbacks=[callback]).validate(task, datamodule=data)


def test_save_to_writes_a_hugging_face_model_with_its_tokenizer(tmp_path: Path) -> None:
    callback = ECoFLaPPruning(**FAST, stages=["validate"], save_to=str(tmp_path / "pruned"))
    task = TinyLlamaTask()
    validate(task, Sentences(), callback, tmp_path)

    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    params = dict(loaded.named_parameters())
    assert len(callback.masks) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, mask in callback.masks.items():
        assert torch.equal(params[name], dict(task.model.named_parameters())[name].detach()), name
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        assert (~mask).float().mean() > 0.3, name
    assert AutoTokenizer.from_pretrained(tmp_path / "pruned")("the cat")["input_ids"] == [8, 5]
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    assert set(report["towers"]) == {"model.layers"} and report["metadata"]["stage"] == "validate"
    assert (tmp_path / "pruned" / "pruning_sparsity.png").exists()
    card = ModelCard.load(tmp_path / "pruned" / "README.md")
    assert card.data.library_name == "transformers" and "`tokenizer.json`" in card.text
    assert f"{100 * report['overall_sparsity']:.2f}% of the model's" in card.text
    assert "as pruned, not trained after pruning" in card.text


def test_save_to_writes_a_state_dict_for_plain_modules_and_again_after_fit(tmp_path: Path) -> None:
    callback = ECoFLaPPruning(**FAST, save_to=str(tmp_path / "pruned"))
    task = ToyTask()
    quiet_trainer(
        max_steps=2, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]
    ).fit(task, datamodule=ToyData())

    loaded = ToyTask(seed=99).model
    load_model(loaded, str(tmp_path / "pruned" / "model.safetensors"))
    for name, param in loaded.named_parameters():  # the fine-tuned weights, written at the end of fit
        assert torch.equal(param, dict(task.model.named_parameters())[name].detach()), name
    for name, mask in callback.masks.items():
        assert torch.count_nonzero(dict(loaded.named_parameters())[name][~mask]) == 0, name
    card = ModelCard.load(tmp_path / "pruned" / "README.md")  # rewritten with the weights
    assert "fine-tuned after pruning, to training step 2, with the pruning masks held fixed" in card.text
    assert card.data.library_name is None  # a plain module


def test_save_to_is_checked_before_pruning_and_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "pruned"
    target.mkdir()
    (target / "shard-00001.safetensors").write_bytes(b"someone else's weights")
    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    callback = ECoFLaPPruning(**FAST, stages=["validate"], save_to=str(target))
    with pytest.raises(FileExistsError, match="not empty; nothing was written. HINT: .*--pruning.overwrite true"):
        validate(task, ToyData(), callback, tmp_path)
    assert not callback.pruned
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in before.items())
    assert [path.name for path in target.iterdir()] == ["shard-00001.safetensors"]

    callback = ECoFLaPPruning(**FAST, stages=["validate"], save_to=str(target), overwrite=True)
    validate(task, ToyData(), callback, tmp_path)
    assert sorted(path.name for path in target.iterdir()) == [
        "README.md",
        "masks",
        "model.safetensors",
        "pruning_report.json",
        "pruning_sparsity.png",
    ]


def test_save_to_without_room_for_the_model_is_refused_before_pruning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    full = shutil.disk_usage(tmp_path)._replace(free=64)  # a disk with 64 bytes left: less than the toy's weights
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: full)
    callback = ECoFLaPPruning(**FAST, stages=["validate"], save_to=str(tmp_path / "pruned"))
    with pytest.raises(
        OSError, match="takes at least .* has 64 bytes free; nothing was written. HINT: free space there"
    ):
        validate(task, ToyData(), callback, tmp_path)
    assert not callback.pruned and not (tmp_path / "pruned").exists()
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in before.items())


def test_save_to_refuses_the_folder_of_the_pretrained_weights(tmp_path: Path) -> None:
    task = TinyLlamaTask()
    task.model.save_pretrained(tmp_path / "dense")
    task.model = LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    for target in (tmp_path / "dense", tmp_path):
        callback = ECoFLaPPruning(**FAST, stages=["validate"], save_to=str(target), overwrite=True)
        with pytest.raises(ValueError, match="holds the source model"):
            validate(task, Sentences(), callback, tmp_path)


@pytest.mark.parametrize("where", ["root", "above the root", "checkpoint folder"])
def test_save_to_refuses_the_folders_the_run_writes_its_logs_and_checkpoints_to(tmp_path: Path, where: str) -> None:
    root = tmp_path / "run"
    earlier = root / "checkpoints" / "epoch=0-step=1.ckpt"  # an earlier run's checkpoint
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"checkpoint")
    targets = {"root": root, "above the root": tmp_path, "checkpoint folder": root / "checkpoints"}
    callback = ECoFLaPPruning(**FAST, save_to=str(targets[where]), overwrite=True)
    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    trainer = quiet_trainer(
        max_steps=2,
        limit_val_batches=0,
        default_root_dir=root,
        enable_checkpointing=True,
        callbacks=[callback, ModelCheckpoint(dirpath=root / "checkpoints")],
    )
    # before: written, the swap deleting the checkpoints (an earlier one and this run's) and the run's saved config
    with pytest.raises(ValueError, match=rf"holds the run's own folder {root}.* HINT: choose a folder of its own"):
        trainer.fit(task, datamodule=ToyData())
    assert not callback.pruned
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in before.items())
    assert earlier.read_bytes() == b"checkpoint"


def test_prune_writes_the_model_once_in_the_chosen_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = []
    real = callback_export.write_pruned_model
    monkeypatch.setattr(callback_export, "write_pruned_model", lambda *a, **k: writes.append(a) or real(*a, **k))
    callback = ECoFLaPPruning(**FAST, save_to=str(tmp_path / "pruned"), save_format="sparse-bitmask")
    trainer = quiet_trainer(EcoflapTrainer, default_root_dir=tmp_path, callbacks=[callback])
    assert isinstance(trainer, EcoflapTrainer)
    trainer.prune(TinyLlamaTask(), datamodule=Sentences())
    assert len(writes) == 1
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    export = report["metadata"]["export"]
    assert export["save_format"] == "sparse-bitmask" and export["weights_bytes"] < export["dense_bytes"]
    loaded = load_pruned_model(tmp_path / "pruned")
    assert AutoTokenizer.from_pretrained(tmp_path / "pruned")("the cat")["input_ids"] == [8, 5]
    assert all(torch.count_nonzero(loaded.get_parameter(name)[~mask]) == 0 for name, mask in callback.masks.items())


def test_a_24_format_needs_24_masks() -> None:
    with pytest.raises(ValueError, match="`save_format` 'sparse-24-bitmask' stores 2:4 masks"):
        ECoFLaPPruning(save_to="out", save_format="sparse-24-bitmask")


@pytest.mark.parametrize("step", [2, 4])  # mid-epoch, and at the end of the first epoch (4 batches an epoch)
def test_a_resumed_fit_replaces_the_save_to_of_the_run_it_continues(tmp_path: Path, step: int) -> None:
    """The interrupted-fit notice says "resume with --ckpt_path; save_to is written again when fit ends": the resumed
    run, with the same settings, must not be refused because its own first run wrote `save_to`; another run must."""
    target = tmp_path / "pruned"
    first = ECoFLaPPruning(**FAST, save_to=str(target))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    settings = dict(num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    quiet_trainer(max_steps=4, callbacks=[first, checkpoints], enable_checkpointing=True, **settings).fit(
        ToyTask(), datamodule=ToyData()
    )
    ckpt = next((tmp_path / "ckpt").glob(f"*step={step}.ckpt"))

    resumed = ECoFLaPPruning(**FAST, save_to=str(target))
    task = ToyTask(seed=5)
    quiet_trainer(max_steps=6, callbacks=[resumed], **settings).fit(task, datamodule=ToyData(), ckpt_path=ckpt)
    assert resumed.masks_from == f"the checkpoint {ckpt}"
    assert all(torch.equal(resumed.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)
    saved = ToyTask(seed=99).model
    load_model(saved, str(target / "model.safetensors"))
    for name, param in saved.named_parameters():  # the weights at the end of the resumed fit
        assert torch.equal(param, dict(task.model.named_parameters())[name].detach()), name

    before = sorted((path.name, path.stat().st_mtime_ns) for path in target.rglob("*"))
    fresh = ECoFLaPPruning(**FAST, save_to=str(target))
    with pytest.raises(FileExistsError, match="not empty; nothing was written. HINT: .*--pruning.overwrite true"):
        quiet_trainer(max_steps=2, callbacks=[fresh], **settings).fit(ToyTask(), datamodule=ToyData())
    assert not fresh.pruned
    assert sorted((path.name, path.stat().st_mtime_ns) for path in target.rglob("*")) == before


@pytest.mark.parametrize("spelled", ["absolute", "home"])  # home: `save_to: ~/pruned`, as a config may give it
@pytest.mark.parametrize("entry", ["validate", "test"])
def test_evaluating_a_pruned_checkpoint_with_the_config_that_saved_its_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, spelled: str
) -> None:
    """The finetune experiments' second step, `ecoflap test -c CONFIG --ckpt_path BEST`, keeps CONFIG's `save_to`,
    which the `fit` filled: nothing is written when the checkpoint is pruned, so it must not be refused (it was, as a
    non-empty folder, and with a `~/` path still was: the export was looked for under a folder named `~`); pruning a
    model in that stage still is, before pruning, the folder untouched."""
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / "pruned"
    save_to = "~/pruned" if spelled == "home" else str(target)
    first = ECoFLaPPruning(**FAST, save_to=save_to)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    settings = dict(num_sanity_val_steps=0, limit_val_batches=1, limit_test_batches=1, default_root_dir=tmp_path)
    quiet_trainer(max_steps=2, callbacks=[first, checkpoints], enable_checkpointing=True, **settings).fit(
        ToyTask(), datamodule=ToyData()
    )
    before = sorted((path.name, path.stat().st_mtime_ns) for path in target.rglob("*"))

    evaluator = ECoFLaPPruning(**FAST, save_to=save_to)
    task = ToyTask(seed=5)
    getattr(quiet_trainer(callbacks=[evaluator], **settings), entry)(
        task, datamodule=ToyData(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert evaluator.masks_from == f"the checkpoint {tmp_path / 'ckpt' / 'last.ckpt'}"
    assert all(torch.equal(evaluator.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)

    pruning = ECoFLaPPruning(**FAST, save_to=save_to)
    dense = ToyTask(seed=6)
    weights = {name: tensor.clone() for name, tensor in dense.model.state_dict().items()}
    with pytest.raises(FileExistsError, match="not empty; nothing was written. HINT: .*--pruning.overwrite true"):
        getattr(quiet_trainer(callbacks=[pruning], **settings), entry)(dense, datamodule=ToyData())
    assert not pruning.pruned
    assert all(torch.equal(dense.model.state_dict()[name], tensor) for name, tensor in weights.items())
    assert sorted((path.name, path.stat().st_mtime_ns) for path in target.rglob("*")) == before


def test_the_console_says_which_model_each_save_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fit` writes `save_to` after pruning, then again at its end: both lines read "Pruned model saved to DIR", so
    the last one on the console did not say that the folder now holds the fine-tuned model."""
    target = tmp_path / "pruned"
    callback = ECoFLaPPruning(**{**FAST, "progress": True}, save_to=str(target))
    quiet_trainer(
        max_steps=3, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]
    ).fit(ToyTask(), datamodule=ToyData())
    said = " ".join(capsys.readouterr().out.split())
    first, last = said.index(f"Pruned model saved to {target} "), said.index(f"fine-tuned to step 3 saved to {target} ")
    assert first < last and said.count("saved to") == 2


def test_the_console_prints_folders_with_brackets_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brackets in a folder name are not console markup (before: "saved to …//pruned" for `[exp1]`, and a
    MarkupError once the model was saved for `[/x]`)."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per message
    run, target = tmp_path / "runs[exp1]", tmp_path / "[exp1]" / "pruned[/x]"
    callback = ECoFLaPPruning(**{**FAST, "progress": True}, save_to=str(target))
    quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=run, callbacks=[callback]).fit(
        ToyTask(), datamodule=ToyData()
    )
    said = capsys.readouterr().out
    assert f"Pruning report: {run / 'pruning_report.json'}\n" in said
    assert f"Pruned model saved to {target} (dense)" in said
    assert f"Pruned model fine-tuned to step 1 saved to {target} (dense)" in said
