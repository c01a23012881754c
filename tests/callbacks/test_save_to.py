"""`save_to` with a tiny Hugging Face LLaMA (and its tokenizer): loads back with from_pretrained, zeros in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import load_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ecoflap_pl.callbacks import ECoFLaPPruning
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
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.model = LlamaForCausalLM(config)
        self.tokenizer = tiny_tokenizer()

    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.calibration_loss(batch), batch_size=batch["input_ids"].shape[0])


class Sentences(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        tokenizer = tiny_tokenizer()
        texts = ["the cat sits on the mat", "a dog runs on the mat", "the dog sits", "a cat runs"] * 4
        ids = tokenizer(texts, padding="max_length", max_length=8, return_tensors="pt")["input_ids"]
        self.samples = [{"input_ids": row} for row in ids]

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
