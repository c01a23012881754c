"""``ecoflap`` end to end on a tiny BLIP-2 and tiny COCO / VQAv2 files in the official layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from transformers import Blip2ForConditionalGeneration
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.cli import _part_of_split_note, comparison_table, main, pruned_notes
from ecoflap_pl.pruning.allocation import Allocation, register_allocation, registry
from ecoflap_pl.pruning.masks import masks_sparsity
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask
from tests.trainers import quiet_trainer


def ecoflap(*args: str) -> subprocess.CompletedProcess:
    """Run the ``ecoflap`` command as a user does (a fresh process per run: LightningCLI parses once per process)."""
    run = subprocess.run([sys.executable, "-m", "ecoflap_pl.cli", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def write_config(tmp_path, task, data, data_dir, init, **pruning):
    """``tmp_path/config.yaml``: the task ``task`` (``init`` its arguments) on the DataModule ``data`` reading
    ``data_dir`` in batches of 2, pruned to 50% from 2 coarse and 2 fine samples; ``pruning`` adds or overrides
    pruning settings. Returns its path."""
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {"class_path": f"ecoflap_pl.tasks.{task}", "init_args": init},
        "data": {
            "class_path": f"ecoflap_pl.datamodules.{data}",
            "init_args": {"data_dir": str(data_dir), "batch_size": 2, "calibration_batch_size": 2},
        },
        "pruning": {"sparsity": 0.5, "coarse_samples": 2, "fine_samples": 2, "progress": False, **pruning},
    }
    path = tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def _config(tmp_path, blip2_dir, demo_data, task="CaptioningTask", data="COCOCaptionDataModule", **pruning):
    init = {"pretrained": str(blip2_dir), "num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 0}
    if task == "VQATask":
        init = {"pretrained": str(blip2_dir), "num_beams": 1, "max_new_tokens": 2}
    return write_config(tmp_path, task, data, demo_data.coco, init, **{"fine_samples": 4, **pruning})


def test_validate_prunes_then_evaluates(tmp_path, blip2_dir, demo_data):
    config = _config(tmp_path, blip2_dir, demo_data, save_to=str(tmp_path / "pruned"))
    ecoflap("validate", "-c", config, *TRAINER)
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    # Every tensor loses exactly round(numel · s), so the achieved total is the target to half a weight per tensor.
    sizes = report["sizes"].values()
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.5 * len(sizes) / sum(sizes))
    assert (tmp_path / "run" / "pruning_sparsity.png").is_file()
    pruned = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    fc1 = pruned.language_model.model.decoder.layers[0].fc1.weight
    assert (fc1 == 0).float().mean().item() > 0.3
    assert not torch.any(pruned.qformer.encoder.layer[0].attention.attention.query.weight == 0)


def test_compare_dense_prints_both(tmp_path, blip2_dir, demo_data):
    config = _config(tmp_path, blip2_dir, demo_data, "VQATask", "VQAv2DataModule", importance="uniform")
    out = ecoflap("validate", "-c", config, *TRAINER, "--compare_dense=true").stdout
    assert "Dense vs pruned" in out and "val/accuracy" in out


def test_prune_subcommand_saves_without_training(tmp_path, blip2_dir, demo_data):
    config = _config(tmp_path, blip2_dir, demo_data, save_to=str(tmp_path / "pruned"), importance="uniform")
    ecoflap("prune", "-c", config, *TRAINER)
    pruned = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    dense = Blip2ForConditionalGeneration.from_pretrained(blip2_dir)
    weight, original = (
        pruned.vision_model.encoder.layers[1].mlp.fc2.weight,
        dense.vision_model.encoder.layers[1].mlp.fc2.weight,
    )
    kept = weight != 0
    assert (~kept).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(weight[kept], original[kept])  # no optimizer step was taken


def test_fit_prunes_then_fine_tunes_with_fixed_masks(tmp_path, blip2_dir, demo_data):
    config = _config(tmp_path, blip2_dir, demo_data, importance="uniform")
    ecoflap("fit", "-c", config, *TRAINER, "--trainer.max_steps=2", "--trainer.limit_val_batches=1")
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    callback_state = next(v for k, v in state["callbacks"].items() if "ECoFLaPPruning" in k)
    assert callback_state["pruned"]
    for name, mask in callback_state["masks"].items():
        assert not state["state_dict"][f"model.{name}"][~mask].any(), name


def test_print_config_and_bad_option_error(tmp_path, blip2_dir, demo_data):
    config = _config(tmp_path, blip2_dir, demo_data)
    printed = ecoflap("validate", "-c", config, "--print_config").stdout
    assert yaml.safe_load(printed)["pruning"]["sparsity"] == 0.5
    bad = subprocess.run(
        [sys.executable, "-m", "ecoflap_pl.cli", "validate", "-c", config, "--pruning.method=wandaa"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "method" in bad.stderr


def test_a_registered_allocation_runs_by_name_though_its_literal_does_not_list_it(
    tmp_path, blip2_dir, demo_data, monkeypatch
):
    """``pruning.allocation`` is the ``AllocationName`` literal or any string, checked by ``PruningConfig`` against
    the registry: a strategy registered from outside the package runs by its name (docs/allocation.md)."""
    monkeypatch.setattr(registry, "_STRATEGIES", registry._STRATEGIES.copy())  # the built-ins only for other tests

    @register_allocation("deeper_is_sparser")
    def deeper_is_sparser(request):
        groups = list(request.groups)
        return Allocation({g: 0.4 + 0.2 * i / (len(groups) - 1) for i, g in enumerate(groups)})

    config = _config(tmp_path, blip2_dir, demo_data, allocation="deeper_is_sparser", method="magnitude")
    monkeypatch.setattr(sys, "argv", ["ecoflap"])  # the entry point, in this process (where the strategy is known)
    main(["prune", "-c", config, *TRAINER])
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["config"]["allocation"] == "deeper_is_sparser"
    assert "coarse" not in report["stages"]  # a strategy that reads no scores runs no coarse step
    # Four blocks in forward order (two of the vision tower, two of the language model): 0.4 rising to 0.6.
    assert list(report["group_sparsity"].values()) == pytest.approx([0.4 + 0.2 * i / 3 for i in range(4)])


def test_the_comparison_keeps_its_title_and_notes_whole() -> None:
    """The title and the notes were the table's title and caption, which rich wraps to the width of its four short
    columns: "Dense vs pruned (60.0% of the candidate" over "weights pruned)", a checkpoint's path cut in two."""
    checkpoint = "/scratch/experiments/blip2_opt27b_vqav2/checkpoints/epoch=9-step=123456.ckpt"
    notes = [f"pruned: masks from the checkpoint {checkpoint}", "dense: the model the config builds"]
    console = Console(width=120, record=True)
    console.print(comparison_table({"val/accuracy": 0.7658}, {"val/accuracy": 0.7399}, 0.6, notes))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert lines[0] == "Dense vs pruned (60.0% of the candidate weights pruned)"
    assert lines[-2:] == notes
    assert "│ val/accuracy │ 0.7658 │ 0.7399 │ -0.0259 │" in lines


def test_the_pruned_column_says_the_zeros_the_model_had_before_pruning(tmp_path) -> None:
    """A model with zeros before pruning was compared as "Dense vs pruned (50.1% of the candidate weights pruned)",
    its own zeros counted as pruned without a word where the sparsity table is not printed (`progress: false`)
    (CASES 239)."""
    task = ToyTask()
    with torch.no_grad():
        task.model.vision[0].fc1.weight[:, :16] = 0  # half of one of the 8 weight matrices
    callback = ECoFLaPPruning(**FAST)
    quiet_trainer(callbacks=[callback], default_root_dir=tmp_path).validate(task, datamodule=ToyData())
    assert pruned_notes(callback) == [
        "pruned: masks from pruning at the start of validate",
        "pruned: 6.2% of the candidate weights were zero before pruning, counted in its sparsity",
    ]


@pytest.mark.parametrize(
    ("limit", "note"),
    [
        (1, "both: the first 1 batches of the val split (`trainer.limit_val_batches` 1)"),
        (0.5, "both: the first 1 batches of the val split (`trainer.limit_val_batches` 0.5)"),
        (5, None),  # above the split's 2 batches: the whole split
        (1.0, None),
    ],
)
def test_the_comparison_says_when_it_covers_part_of_the_split(tmp_path, limit, note) -> None:
    """`--trainer.limit_val_batches 1` with `--compare_dense` printed both columns as the split's metrics without a
    word that they were of its first batch alone."""
    trainer = quiet_trainer(limit_val_batches=limit, default_root_dir=tmp_path)
    trainer.validate(ToyTask(), datamodule=ToyData())
    assert _part_of_split_note(trainer, "val") == ([] if note is None else [note])


def test_the_comparison_title_of_masks_without_a_report_counts_the_masks() -> None:
    """A checkpoint that kept the masks but no report (written before reports were kept) was titled "0.0% of the
    candidate weights pruned"."""
    callback = ECoFLaPPruning(**FAST)
    callback.masks = {"a.weight": torch.tensor([[True, False], [False, False]]), "b.weight": torch.ones(4, dtype=bool)}
    assert callback.result is None
    assert masks_sparsity(callback.masks) == 3 / 8  # what the comparison's title shows for it


class _RecordsSplitNote(Callback):
    """Writes the comparison's note on the part of the val split evaluated, as rank 0 computes it, to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(_part_of_split_note(trainer, "val")))


@pytest.mark.distributed
def test_the_part_of_the_split_note_counts_the_batches_of_every_rank(tmp_path: Path) -> None:
    """Under DDP each rank evaluates `limit_val_batches` batches of its own share: the note named one rank's count,
    "the first 1 batches", where the two ranks had evaluated the split's first 2."""
    note = tmp_path / "note.json"
    trainer = quiet_trainer(
        limit_val_batches=1,
        strategy="ddp_spawn",
        devices=2,
        default_root_dir=tmp_path,
        callbacks=[_RecordsSplitNote(note)],
    )
    trainer.validate(ToyTask(), datamodule=ToyData(batch_size=2))  # 8 val samples: 2 batches on each rank
    assert json.loads(note.read_text()) == [
        "both: the first 2 batches of the val split, 1 on each of the 2 ranks (`trainer.limit_val_batches` 1)"
    ]
