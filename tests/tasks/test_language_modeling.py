"""LanguageModelingTask on tiny LLaMA (causal) and T5 (prefix-LM) with TextDataModule files."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from ecoflap_pl.datamodules.text import TextDataModule
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.models.tokenizers import train_tokenizer
from ecoflap_pl.tasks.language_modeling import LanguageModelingTask
from tests.tasks.task_helpers import validate_once_twice_and_on_two_processes
from tests.trainers import quiet_trainer

CORPUS = [
    "the red three sits left of the blue seven",
    "two digits are on a dark background",
    "a green five and a yellow one",
    "is the left digit even ? yes",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_tokenizers")
    dirs = {}
    for family, template in (("llama", "bos"), ("t5", "eos")):
        train_tokenizer(CORPUS * 3, vocab_size=120, template=template).save_pretrained(root / family)
        dirs[family] = str(root / family)
    return dirs


def _task(family: str, tokenizer_dirs) -> LanguageModelingTask:
    torch.manual_seed(0)
    config = tiny_config(family).to_dict()
    return LanguageModelingTask(model_config=config, tokenizer=tokenizer_dirs[family], max_length=16)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_perplexity_is_exp_of_the_model_loss_per_token(tokenizer_dirs, family):
    # the model's own loss is the mean over the batch's target tokens (shifted inside a causal model): exp of it is
    # the perplexity of the batch, documents of unequal length included
    task = _task(family, tokenizer_dirs).eval()
    batch = task.collator([{"text": CORPUS[0], "text_id": 0}, {"text": CORPUS[1], "text_id": 1}])
    assert batch["text_id"] == [0, 1]
    with torch.no_grad():
        loss = task.calibration_loss(batch)  # a batch with its ids: they never reach the model's forward
        task._update_perplexity(task.val_perplexity, batch)
    # rel_tol: the model's loss is an fp32 mean, the metric's a float64 sum
    assert math.isclose(task.val_perplexity.compute().item(), math.exp(loss.item()), rel_tol=1e-5)


def test_causal_labels_mask_padding(tokenizer_dirs):
    task = _task("llama", tokenizer_dirs)
    batch = task.collator([{"text": CORPUS[0]}, {"text": "two digits"}])
    padded = batch["attention_mask"] == 0
    assert padded.any()
    assert (batch["labels"][padded] == -100).all()
    assert (batch["labels"][~padded] == batch["input_ids"][~padded]).all()


def test_encoder_decoder_uses_the_prefix_split(tokenizer_dirs):
    task = _task("t5", tokenizer_dirs)
    text = CORPUS[1]
    batch = task.collator([{"text": text}])
    prefix = task.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).replace(" ", "")
    target = task.tokenizer.decode(batch["labels"][0], skip_special_tokens=True).replace(" ", "")
    assert prefix + target == text.replace(" ", "")
    assert 1 <= len(prefix) <= len(text) // 2
    assert batch["labels"][0, -1].item() == task.tokenizer.eos_token_id
    assert torch.isfinite(task.calibration_loss(batch))


def test_model_config_needs_a_tokenizer():
    with pytest.raises(ValueError, match="`tokenizer` must be given"):
        LanguageModelingTask(model_config=tiny_config("llama").to_dict())


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_fit_and_validate_through_the_trainer(tmp_path, tokenizer_dirs, family):
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as handle:
        for text in CORPUS * 2:
            handle.write(json.dumps({"text": text, "url": "x", "timestamp": "t"}) + "\n")
    (tmp_path / "wiki.valid.raw").write_text("\n = Digits = \n\n" + "\n\n".join(CORPUS) + "\n", encoding="utf-8")
    task = _task(family, tokenizer_dirs)
    data = TextDataModule(
        tmp_path, train_file="c4-train.00000-of-01024.json.gz", val_file="wiki.valid.raw", batch_size=2
    )
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(task, datamodule=data)
    assert any(not torch.equal(before[n], p) for n, p in task.model.named_parameters())
    metrics = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert math.isfinite(metrics["val/perplexity"]) and metrics["val/perplexity"] > 1


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_perplexity_under_two_process_ddp_equals_one_process(tmp_path, tokenizer_dirs, family, trainer_factory):
    """5 documents on 2 ranks: the DistributedSampler repeats document 0 on rank 1, whose tokens count once."""
    (tmp_path / "wiki.valid.raw").write_text("\n".join(CORPUS + ["the blue seven is odd"]) + "\n", encoding="utf-8")
    data = TextDataModule(tmp_path, train_file="wiki.valid.raw", val_file="wiki.valid.raw")
    samples = list(data.dataset("val"))
    assert [sample["text_id"] for sample in samples] == [0, 1, 2, 3, 4]
    single, repeat_counted, distributed = validate_once_twice_and_on_two_processes(
        _task(family, tokenizer_dirs), samples, "text_id", trainer_factory
    )
    # torchmetrics' sums counted document 0 again under DDP: the repeat-counted perplexity
    assert repeat_counted["val/perplexity"] != pytest.approx(single["val/perplexity"], rel=1e-3)
    assert distributed["val/perplexity"] == pytest.approx(single["val/perplexity"], rel=1e-6)
