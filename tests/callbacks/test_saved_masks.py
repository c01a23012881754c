"""A model loaded from a ``save_to`` folder is already pruned: its saved masks are read back and held fixed, it is not
pruned again (unless ``reuse_saved_masks`` is off), and a folder whose weights no longer fit its masks is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.callbacks import pruning as pruning_callback
from ecoflap_pl.cli import EcoflapTrainer
from ecoflap_pl.export import checkpoint, read_masks
from ecoflap_pl.export.checkpoint import MASKS_FILE
from ecoflap_pl.models.loading import load_pretrained
from tests.callbacks.callback_toys import FAST
from tests.callbacks.test_save_to import Sentences, TinyLlamaTask
from tests.trainers import quiet_trainer

FORMATS = ["dense", "sparse-bitmask"]


class SavedLlamaTask(TinyLlamaTask):
    """The tiny LLaMA task with its model loaded from ``folder``, as ``pretrained: DIR`` loads it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.model = load_pretrained(LlamaForCausalLM, str(folder))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)


def saved_model(tmp_path: Path, save_format: str) -> Path:
    """``ecoflap prune``'s run: prune the tiny LLaMA and save it to ``tmp_path/pruned`` in ``save_format``."""
    folder = tmp_path / "pruned"
    callback = ECoFLaPPruning(**FAST, save_to=str(folder), save_format=save_format)
    trainer = quiet_trainer(EcoflapTrainer, default_root_dir=tmp_path / "prune", callbacks=[callback])
    assert isinstance(trainer, EcoflapTrainer)
    trainer.prune(TinyLlamaTask(), datamodule=Sentences())
    return folder


@pytest.fixture
def prune_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The engine's ``prune`` as the callback calls it, recording each call (tests clear it once they saved)."""
    calls: list[Any] = []
    real = pruning_callback.prune
    monkeypatch.setattr(pruning_callback, "prune", lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    return calls


@pytest.mark.parametrize("stages", [["fit"], []])  # before: pruned again; fine-tuned with no masks held fixed
@pytest.mark.parametrize("save_format", FORMATS)
def test_fine_tuning_a_saved_model_keeps_its_masks_and_does_not_prune_it_again(
    tmp_path: Path, save_format: str, stages: list[str], prune_calls: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    folder = saved_model(tmp_path, save_format)
    prune_calls.clear()
    saved_masks = read_masks(folder)
    report = json.loads((folder / "pruning_report.json").read_text())
    task = SavedLlamaTask(folder)
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    callback = ECoFLaPPruning(**FAST, stages=stages)
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    quiet_trainer(
        max_steps=3, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]
    ).fit(task, datamodule=Sentences())

    assert prune_calls == []  # before, the saved model was pruned again (other masks, a higher sparsity)
    assert callback.masks_from == f"the saved model {folder}"
    assert f"masks from the saved model {folder}): `fit` uses it as it is, it is not pruned again." in caplog.text
    assert set(callback.masks) == set(saved_masks)
    weights = task.model.state_dict()
    for name, mask in saved_masks.items():
        assert torch.equal(callback.masks[name].cpu(), mask), name
        assert torch.count_nonzero(weights[name][~mask]) == 0, name
        assert not torch.equal(weights[name][mask], before[name][mask]), name  # the kept weights were trained
    assert callback.result is not None
    assert callback.result.overall_sparsity == pytest.approx(report["overall_sparsity"])
    state = callback.state_dict()  # the masks travel in the checkpoints of the fine-tuning run
    assert state["pruned"] and all(torch.equal(state["masks"][name], mask) for name, mask in saved_masks.items())


@pytest.mark.parametrize("save_format", FORMATS)
def test_validating_a_saved_model_with_the_default_stages_evaluates_it_as_saved(
    tmp_path: Path, save_format: str, prune_calls: list[Any]
) -> None:
    folder = saved_model(tmp_path, save_format)
    prune_calls.clear()
    task = SavedLlamaTask(folder)
    saved = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    callback = ECoFLaPPruning(**FAST)
    metrics = quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(task, datamodule=Sentences())

    assert prune_calls == [] and callback.pruned
    assert metrics[0]["val/loss"] > 0
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in saved.items())
    assert all(torch.equal(callback.masks[name], mask) for name, mask in read_masks(folder).items())


def test_reuse_saved_masks_off_prunes_a_saved_model_again(tmp_path: Path, prune_calls: list[Any]) -> None:
    folder = saved_model(tmp_path, "dense")
    prune_calls.clear()
    callback = ECoFLaPPruning(**{**FAST, "sparsity": 0.7}, stages=["validate"], reuse_saved_masks=False)
    quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(
        SavedLlamaTask(folder), datamodule=Sentences()
    )

    assert len(prune_calls) == 1 and callback.masks_from == "pruning at the start of validate"
    assert callback.result is not None and callback.result.overall_sparsity == pytest.approx(0.7, abs=0.01)


def test_reuse_saved_masks_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`reuse_saved_masks` must be True or False, got 'no'"):
        ECoFLaPPruning(reuse_saved_masks="no")  # type: ignore[arg-type]


def test_a_saved_model_whose_weights_were_changed_is_refused(tmp_path: Path, prune_calls: list[Any]) -> None:
    folder = saved_model(tmp_path, "dense")
    prune_calls.clear()
    name, mask = next(iter(read_masks(folder).items()))
    weights = load_file(folder / "model.safetensors")
    weights[name][~mask] = 0.5  # the pruned weights, no longer zero
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    task = SavedLlamaTask(folder)
    changed = {key: tensor.clone() for key, tensor in task.model.state_dict().items()}
    callback = ECoFLaPPruning(**FAST)
    with pytest.raises(ValueError, match=rf"weights in {folder} are not zero where its masks prune them .*HINT:"):
        quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(task, datamodule=Sentences())
    assert prune_calls == [] and not callback.pruned
    assert all(torch.equal(task.model.state_dict()[key], tensor) for key, tensor in changed.items())


def test_saved_masks_that_name_no_parameter_of_the_model_are_refused(tmp_path: Path) -> None:
    folder = saved_model(tmp_path, "dense")
    masks = read_masks(folder)
    masks["model.layers.9.mlp.up_proj.weight"] = torch.ones(64, 32, dtype=torch.bool)  # a layer the model lacks
    checkpoint._write_masks(masks, folder / MASKS_FILE)
    callback = ECoFLaPPruning(**FAST)
    with pytest.raises(ValueError, match=r"'model.layers.9.mlp.up_proj.weight' is \[64, 32\], but the model has none"):
        quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(
            SavedLlamaTask(folder), datamodule=Sentences()
        )
    assert not callback.pruned


def test_a_saved_model_without_its_report_is_used_but_not_saved_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = saved_model(tmp_path, "dense")
    (folder / "pruning_report.json").unlink()
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    callback = ECoFLaPPruning(**FAST)
    quiet_trainer(default_root_dir=tmp_path, callbacks=[callback]).validate(
        SavedLlamaTask(folder), datamodule=Sentences()
    )
    assert callback.pruned and callback.result is None
    assert f"The model is already pruned (50.0% of the candidate weights; masks from the saved model {folder})" in (
        caplog.text
    )

    callback = ECoFLaPPruning(**FAST, stages=["fit"], save_to=str(tmp_path / "tuned"))
    with pytest.raises(ValueError, match=r"has no readable pruning_report.json, .* HINT: put back the"):
        quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]).fit(
            SavedLlamaTask(folder), datamodule=Sentences()
        )
    assert not (tmp_path / "tuned").exists()


def test_masks_that_the_24_format_cannot_store_are_refused_before_fine_tuning(tmp_path: Path) -> None:
    folder = saved_model(tmp_path, "sparse-bitmask")  # unstructured masks
    task = SavedLlamaTask(folder)
    before = {name: tensor.clone() for name, tensor in task.model.state_dict().items()}
    callback = ECoFLaPPruning(
        **FAST, structure="2:4", importance="uniform", save_to=str(tmp_path / "tuned"), save_format="sparse-24-bitmask"
    )
    # before: fine-tuned, then "… 2 of every 4 consecutive input weights …" when the end of `fit` saved it
    with pytest.raises(ValueError, match=rf"the masks from the saved model {folder} are not 2:4 .* HINT: save with"):
        quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]).fit(
            task, datamodule=Sentences()
        )
    assert all(torch.equal(task.model.state_dict()[name], tensor) for name, tensor in before.items())
    assert not (tmp_path / "tuned").exists()


def test_the_card_counts_the_training_steps_of_every_fine_tuning_since_pruning(tmp_path: Path) -> None:
    folder = saved_model(tmp_path, "dense")

    def save(source: Path, target: Path, steps: int) -> str:
        """Fine-tune the model saved in ``source`` for ``steps`` (0: `ecoflap prune`, which converts it to another
        save_format) and save it to ``target``; the card's line on the weights."""
        callback = ECoFLaPPruning(**FAST, save_to=str(target), save_format="sparse-bitmask")
        trainer = quiet_trainer(
            EcoflapTrainer, max_steps=steps, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback]
        )
        assert isinstance(trainer, EcoflapTrainer)
        run = trainer.fit if steps else trainer.prune
        run(SavedLlamaTask(source), datamodule=Sentences())
        card = ModelCard.load(target / "README.md").text
        return next(line for line in card.splitlines() if line.startswith("- **Weights**"))

    # before: "fine-tuned after pruning, to training step 0", then "… step 2" for the second fine-tuning
    assert "as pruned, not trained after pruning" in save(folder, tmp_path / "converted", 0)
    assert "fine-tuned after pruning, to training step 3," in save(folder, tmp_path / "tuned", 3)
    assert "to training step 5," in save(tmp_path / "tuned", tmp_path / "tuned_more", 2)
    assert "to training step 5," in save(tmp_path / "tuned_more", tmp_path / "shipped", 0)
    report = json.loads((tmp_path / "shipped" / "pruning_report.json").read_text())
    assert report["metadata"]["export"]["fine_tuned_to_step"] == 5


def test_a_resumed_fine_tuning_of_a_saved_model_replaces_the_save_to_it_wrote(tmp_path: Path) -> None:
    """`fit --ckpt_path` continuing a fine-tuning of a saved folder (to more steps, once it ended) replaces its own
    export, as for a model pruned by the run (before: "a folder that is not empty", its report carrying the saved
    folder's `export` entry never matched)."""
    folder = saved_model(tmp_path, "dense")
    target = tmp_path / "tuned"
    settings = dict(num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    first = ECoFLaPPruning(**FAST, save_to=str(target))
    quiet_trainer(max_steps=2, callbacks=[first, checkpoints], enable_checkpointing=True, **settings).fit(
        SavedLlamaTask(folder), datamodule=Sentences()
    )
    resumed = ECoFLaPPruning(**FAST, save_to=str(target))
    quiet_trainer(max_steps=4, callbacks=[resumed], **settings).fit(
        SavedLlamaTask(folder), datamodule=Sentences(), ckpt_path=next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    )
    assert "fine-tuned after pruning, to training step 4," in ModelCard.load(target / "README.md").text

    other = ECoFLaPPruning(**FAST, save_to=str(target))  # another fine-tuning of the same saved model
    with pytest.raises(FileExistsError, match="not empty; nothing was written"):
        quiet_trainer(max_steps=2, callbacks=[other], **settings).fit(SavedLlamaTask(folder), datamodule=Sentences())


def test_the_steps_of_a_model_pruned_after_dense_training_count_from_pruning(tmp_path: Path) -> None:
    """`fit --ckpt_path` of a dense checkpoint at step 2 prunes at step 2, then trains to step 5: the card said "to
    training step 5" (the dense steps counted) where the comparison of the run's checkpoint said 3, and fine-tuning
    the saved model 2 steps more would have counted from its report's step 2."""
    settings = dict(num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    dense = quiet_trainer(max_steps=2, **settings)
    dense.fit(TinyLlamaTask(), datamodule=Sentences())
    dense.save_checkpoint(tmp_path / "dense.ckpt")

    callback = ECoFLaPPruning(**FAST, save_to=str(tmp_path / "pruned"))
    tuned = quiet_trainer(max_steps=5, callbacks=[callback], **settings)
    tuned.fit(TinyLlamaTask(), datamodule=Sentences(), ckpt_path=tmp_path / "dense.ckpt")
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    assert report["metadata"]["global_step"] == 2  # pruned at the dense checkpoint's step
    assert report["metadata"]["export"]["fine_tuned_to_step"] == 3
    assert "fine-tuned after pruning, to training step 3," in ModelCard.load(tmp_path / "pruned" / "README.md").text

    tuned.save_checkpoint(tmp_path / "tuned.ckpt")
    evaluator = ECoFLaPPruning(**FAST)
    quiet_trainer(callbacks=[evaluator], limit_val_batches=1, default_root_dir=tmp_path).validate(
        TinyLlamaTask(), datamodule=Sentences(), ckpt_path=tmp_path / "tuned.ckpt"
    )
    assert evaluator.fine_tuned_to_step == 3  # what `--compare_dense` notes

    more = ECoFLaPPruning(**FAST, save_to=str(tmp_path / "tuned_more"))
    quiet_trainer(max_steps=2, callbacks=[more], **settings).fit(
        SavedLlamaTask(tmp_path / "pruned"), datamodule=Sentences()
    )
    assert "to training step 5," in ModelCard.load(tmp_path / "tuned_more" / "README.md").text


def test_a_dense_checkpoint_pruned_as_it_is_evaluated_was_not_fine_tuned_after_pruning(tmp_path: Path) -> None:
    """`validate --compare_dense --ckpt_path` of a dense checkpoint at step 2 written without the pruning callback
    prunes it at the start of `validate`: the comparison noted "fine-tuned after pruning, to training step 2"."""
    dense = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    dense.fit(TinyLlamaTask(), datamodule=Sentences())
    dense.save_checkpoint(tmp_path / "dense.ckpt")

    evaluator = ECoFLaPPruning(**FAST)
    quiet_trainer(callbacks=[evaluator], limit_val_batches=1, default_root_dir=tmp_path).validate(
        TinyLlamaTask(), datamodule=Sentences(), ckpt_path=tmp_path / "dense.ckpt"
    )
    assert evaluator.masks_from == "pruning at the start of validate"
    assert evaluator.fine_tuned_to_step is None
