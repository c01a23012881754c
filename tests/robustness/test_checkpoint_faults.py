"""Resuming from a pruned checkpoint, and checkpoints damaged after they were written (see ``CASES.md``): the masks come
back bit for bit; a cut or changed file is refused in one message before the model is built."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.callbacks.checkpoint_file import WholeFileCheckpointIO, check_checkpoint_file, least_checkpoint_bytes
from ecoflap_pl.cli import EcoflapTrainer, main
from ecoflap_pl.export import atomic, load_pruned_state_dict
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask
from tests.robustness import test_cli_faults
from tests.robustness.cli_runs import TRAINER, folder_digest, run_ecoflap, vit_config
from tests.robustness.test_cli_faults import short_error
from tests.trainers import quiet_trainer

pruned_run = test_cli_faults.pruned_run  # a pruned, fine-tuned checkpoint (a module-scoped fixture)


def callback_state(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    pruning = next(value for key, value in state["callbacks"].items() if "ECoFLaPPruning" in key)
    return state, pruning["masks"]


def test_resuming_fit_keeps_the_masks_bit_for_bit(capsys, tmp_path, demo_data, pruned_run):
    checkpoint, _ = pruned_run
    first, masks = callback_state(checkpoint)
    config = vit_config(tmp_path, demo_data, importance="uniform")
    outcome = run_ecoflap(
        capsys,
        "fit",
        "-c",
        config,
        f"--ckpt_path={checkpoint}",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=0",
    )
    assert outcome.code == 0, outcome.text[-3000:]
    assert "not pruned again" in outcome.text
    resumed, resumed_masks = callback_state(next((tmp_path / "run").rglob("*.ckpt")))
    assert resumed["global_step"] == 4 and first["global_step"] == 2
    assert resumed_masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(resumed_masks[name], mask), name
        weight, before = resumed["state_dict"][f"model.{name}"], first["state_dict"][f"model.{name}"]
        assert torch.count_nonzero(weight[~mask]) == 0, name  # pruned weights stay zero through the new steps
        assert not torch.equal(weight[mask], before[mask]), name  # while the kept ones train


def test_resuming_fit_from_a_weights_only_checkpoint_is_refused_before_the_model_is_built(
    capsys, tmp_path, demo_data, pruned_run
):
    """Lightning refused it with a KeyError traceback when it restored the optimizers, after the model was built and
    restored (and, before weights-only checkpoints kept the masks, after pruning it again)."""
    checkpoint, _ = pruned_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights_only = tmp_path / "weights_only.ckpt"
    for key in ("optimizer_states", "lr_schedulers"):  # what Lightning leaves out of a weights-only checkpoint
        del state[key]
    torch.save(state, weights_only)
    outcome = run_ecoflap(
        capsys, "fit", "-c", vit_config(tmp_path, demo_data), f"--ckpt_path={weights_only}", "--trainer.max_steps=4"
    )
    hint = "or save it with `ecoflap prune --ckpt_path` (--pruning.save_to DIR) and fine-tune DIR."
    short_error(outcome, f"`ckpt_path` '{weights_only}' holds the weights only", "ecoflap test --ckpt_path", hint)
    assert not (tmp_path / "run").exists()  # refused before the run started


def last_checkpoint(tmp_path: Path, state: dict) -> Path:
    """Write ``state`` where Lightning looks for ``--ckpt_path last`` in the run of ``vit_config(tmp_path, ...)``
    (no logger: ``default_root_dir/checkpoints/last.ckpt``)."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(state, last)
    return last


@pytest.mark.parametrize("ckpt_path", ["last", "weights_only"])
def test_resuming_fit_from_last_when_it_is_weights_only_is_refused_before_the_run_starts(
    capsys, tmp_path, demo_data, pruned_run, ckpt_path
):
    """`last` is resolved by Lightning when the run starts: a weights-only last checkpoint ended in Lightning's KeyError
    traceback after it was restored. Lightning's resolution now runs before the run, and the file it finds gets the
    checks of a `ckpt_path` file."""
    checkpoint, _ = pruned_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("optimizer_states", "lr_schedulers"):  # what Lightning leaves out of a weights-only checkpoint
        del state[key]
    last = last_checkpoint(tmp_path, state)
    if ckpt_path == "weights_only":  # an explicit file: refused before the model is built, as before
        ckpt_path = str(last)
    outcome = run_ecoflap(
        capsys, "fit", "-c", vit_config(tmp_path, demo_data), f"--ckpt_path={ckpt_path}", "--trainer.max_steps=4"
    )
    short_error(outcome, f"`ckpt_path` '{last}' holds the weights only", "HINT", "ecoflap test --ckpt_path")
    assert "Trying to restore optimizer state" not in outcome.text
    assert [path.name for path in (tmp_path / "run").rglob("*") if path.is_file()] == ["last.ckpt"]


def fine_tuned_checkpoints(tmp_path: Path, demo_data, *options: str) -> dict[str, Path]:
    """``ecoflap fit`` of the tiny ViT (``options`` added), two optimizer steps saved at the same step by two
    ``ModelCheckpoint``s: whole, and weights-only (``save_weights_only=True``), by kind."""
    path = vit_config(tmp_path, demo_data, importance="uniform")
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    # Another `every_n_train_steps` each (Lightning refuses two ModelCheckpoints of one state key); both save step 2.
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    config["trainer"]["callbacks"] = [
        {"class_path": checkpoint, "init_args": {"dirpath": str(tmp_path / kind), **settings}}
        for kind, settings in (
            ("whole", {"every_n_train_steps": 2}),
            ("weights_only", {"every_n_train_steps": 1, "save_weights_only": True}),
        )
    ]
    Path(path).write_text(yaml.safe_dump(config), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["fit", "-c", path, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", *options])
    checkpoints = {kind: tmp_path / kind / "epoch=0-step=2.ckpt" for kind in ("whole", "weights_only")}
    assert "optimizer_states" not in torch.load(checkpoints["weights_only"], map_location="cpu", weights_only=False)
    return checkpoints


@pytest.fixture(scope="module")
def pruned_checkpoints(tmp_path_factory, demo_data) -> dict[str, Path]:
    """A model pruned to 50% then fine-tuned for two steps, saved whole and weights-only."""
    return fine_tuned_checkpoints(tmp_path_factory.mktemp("pruned_checkpoints"), demo_data)


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory, demo_data) -> dict[str, Path]:
    """A dense model fine-tuned for two steps (``pruning.stages: []``), saved whole and weights-only."""
    return fine_tuned_checkpoints(tmp_path_factory.mktemp("dense_checkpoints"), demo_data, "--pruning.stages=[]")


def pruned_export(capsys, tmp_path: Path, demo_data, name: str, *options: str) -> tuple[dict, dict, str]:
    """``ecoflap prune`` of the tiny ViT (``options`` added) saved to ``tmp_path/name``: the export's weights, its masks
    and its model card, after the checks that the run succeeded."""
    save_to = tmp_path / name
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(save_to))
    outcome = run_ecoflap(capsys, "prune", "-c", config, *options)
    assert outcome.code == 0, outcome.text[-3000:]
    assert "Trying to restore optimizer state" not in outcome.text
    weights, masks = load_pruned_state_dict(save_to)
    return weights, masks, (save_to / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("ckpt_path", ["file", "last"])
def test_prune_from_a_weights_only_checkpoint_of_a_pruned_model_saves_it_as_a_whole_one_does(
    capsys, tmp_path, demo_data, pruned_checkpoints, ckpt_path
):
    """`prune` runs `fit` with no step, and Lightning's `fit` restored the optimizer state: a weights-only checkpoint
    was refused (before, Lightning's KeyError traceback after the model was built and restored), though no step uses
    it. It is restored as a whole one is: its masks bit for bit, not pruned again, the fine-tuned weights saved."""
    whole, weights_only = pruned_checkpoints["whole"], pruned_checkpoints["weights_only"]
    state = torch.load(weights_only, map_location="cpu", weights_only=False)
    masks = next(value for key, value in state["callbacks"].items() if "ECoFLaPPruning" in key)["masks"]
    expected = pruned_export(capsys, tmp_path, demo_data, "from_whole", f"--ckpt_path={whole}")
    if ckpt_path == "last":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(weights_only, tmp_path / "run" / "checkpoints" / "last.ckpt")
    digest = folder_digest(weights_only.parent)
    saved = pruned_export(
        capsys, tmp_path, demo_data, "pruned", f"--ckpt_path={weights_only if ckpt_path == 'file' else 'last'}"
    )
    assert folder_digest(weights_only.parent) == digest
    assert saved[1].keys() == masks.keys() == expected[1].keys() and masks
    for name, mask in masks.items():
        assert torch.equal(saved[1][name], mask) and torch.equal(expected[1][name], mask), name
    assert saved[0].keys() == expected[0].keys()
    for name, weight in saved[0].items():
        assert torch.equal(weight, state["state_dict"][f"model.{name}"]), name  # the fine-tuned weights, as they were
        assert torch.equal(weight, expected[0][name]), name
    assert "fine-tuned after pruning, to training step 2, with the pruning masks held fixed" in saved[2]
    assert without_dates(saved[2]) == without_dates(expected[2])


def test_prune_from_a_weights_only_checkpoint_of_a_dense_model_prunes_its_weights(
    capsys, tmp_path, demo_data, dense_checkpoints
):
    """The dense model of the checkpoint is pruned, not the model the config builds: the saved weights are the
    checkpoint's with the masks applied, as from the whole checkpoint."""
    weights_only = dense_checkpoints["weights_only"]
    state = torch.load(weights_only, map_location="cpu", weights_only=False)
    assert "callbacks" not in state  # a dense model: no pruning state to keep
    saved, masks, card = pruned_export(capsys, tmp_path, demo_data, "pruned", f"--ckpt_path={weights_only}")
    expected = pruned_export(capsys, tmp_path, demo_data, "whole", f"--ckpt_path={dense_checkpoints['whole']}")
    fresh = pruned_export(capsys, tmp_path, demo_data, "fresh")
    assert masks and masks.keys() == expected[1].keys() == fresh[1].keys()
    for name, weight in saved.items():
        dense = state["state_dict"][f"model.{name}"]
        if name in masks:
            assert torch.equal(weight, dense * masks[name]) and torch.count_nonzero(dense[~masks[name]]), name
            assert torch.equal(masks[name], expected[1][name]), name
        else:
            assert torch.equal(weight, dense), name
        assert torch.equal(weight, expected[0][name]), name
        assert not torch.equal(weight, fresh[0][name]), name  # the config's model, pruned without the checkpoint
    assert without_dates(card) == without_dates(expected[2])
    # Trained to step 2, then pruned: pruning ran before Lightning restored the step, so the report said step 0 and the
    # end of the run saved the model again, its card saying "fine-tuned after pruning, to training step 2".
    assert "fine-tuned after pruning" not in card and "fine-tuned after pruning" not in expected[2]
    for folder in ("pruned", "whole"):
        report = json.loads((tmp_path / folder / "pruning_report.json").read_text(encoding="utf-8"))
        assert report["metadata"]["global_step"] == state["global_step"] == 2, folder


def without_dates(card: str) -> str:
    """A model card without the times it names (when the model was pruned and saved)."""
    return re.sub(r"\d{4}-\d\d-\d\dT[\d:.+-]+", "DATE", card)


def test_a_last_checkpoint_of_another_task_is_refused_before_the_run_starts(capsys, tmp_path, demo_data, pruned_run):
    """LightningCLI rebuilds the task a `ckpt_path` file names (refused when it is not the config's), but not for
    `last`: the config's task restored the other task's checkpoint without a word."""
    checkpoint, _ = pruned_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["_class_path"] == "ecoflap_pl.tasks.ClassificationTask"
    state["hyper_parameters"]["_class_path"] = "ecoflap_pl.tasks.VQATask"
    last = last_checkpoint(tmp_path, state)
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--ckpt_path=last")
    short_error(outcome, f"`ckpt_path` 'last' ({last}) was written by the task ecoflap_pl.tasks.VQATask", "HINT")


def test_a_last_checkpoint_of_another_model_config_is_rebuilt_as_trained(capsys, tmp_path, demo_data, pruned_run):
    """LightningCLI replaces the config's model arguments by a `ckpt_path` file's hyperparameters, but not for `last`:
    the config's model (another width) was built and the checkpoint restored into it, with torch's size-mismatch
    traceback; an argument that changes no shape changed the model without a word. `last` now gets what its file
    gets: the same warning and the same model."""
    checkpoint, _ = pruned_run
    last = last_checkpoint(tmp_path, torch.load(checkpoint, map_location="cpu", weights_only=False))
    other = vit_config(tmp_path, demo_data, model={"embed_dim": 48})
    by_file = run_ecoflap(capsys, "validate", "-c", other, f"--ckpt_path={last}")
    outcome = run_ecoflap(capsys, "validate", "-c", other, "--ckpt_path=last")
    assert outcome.code == 0, outcome.text[-3000:]
    replaced = "The checkpoint's hyperparameters replace these model arguments of the config: model_config"
    assert outcome.text.count(replaced) == by_file.text.count(replaced) == 1
    assert outcome.metric("val/loss") == by_file.metric("val/loss")


def test_a_damaged_last_checkpoint_is_refused_before_the_run_starts(capsys, tmp_path, demo_data, pruned_run):
    checkpoint, _ = pruned_run
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    largest, data = with_a_changed_bit(checkpoint, last)
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--ckpt_path=last")
    short_error(outcome, f"`ckpt_path` '{last}' is damaged: {largest.filename} does not match", "HINT")
    assert last.read_bytes() == data


def test_last_without_a_checkpoint_warns_once_and_starts_without_one(capsys, tmp_path, demo_data):
    """Lightning's own behaviour (a warning, not an error, so that `last` can be set before the first run), said once
    though the command resolves `last` before the run."""
    outcome = run_ecoflap(
        capsys, "fit", "-c", vit_config(tmp_path, demo_data), "--ckpt_path=last", "--trainer.max_steps=1"
    )
    assert outcome.code == 0, outcome.text[-3000:]
    assert outcome.text.count('ckpt_path="last") is set, but there is no last checkpoint available') == 1


@pytest.mark.parametrize("dirpath", [None, "checkpoints"])
def test_last_finds_the_previous_run_of_a_config_with_a_logger(capsys, tmp_path, demo_data, dirpath):
    """The *_finetune experiments' Trainer: the default logger and a `ModelCheckpoint(save_last=True)`. Without
    `dirpath`, each run saves in a new version folder, where Lightning looks for `last`: it warned "Set
    `ModelCheckpoint(..., save_last=True)`" (set already) and started over, pruning again, refused by the `save_to`
    the first run wrote. It is refused, naming the file; with `dirpath` (as the experiments now have) `last` resumes."""
    path = vit_config(tmp_path, demo_data, save_to=str(tmp_path / "pruned"))
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    del config["trainer"]["logger"]
    checkpoints = {"save_last": True, **({"dirpath": str(tmp_path / dirpath)} if dirpath else {})}
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoints}
    ]
    Path(path).write_text(yaml.safe_dump(config), encoding="utf-8")
    first = run_ecoflap(capsys, "fit", "-c", path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1")
    assert first.code == 0, first.text[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    outcome = run_ecoflap(
        capsys, "fit", "-c", path, "--ckpt_path=last", "--trainer.max_steps=4", "--trainer.limit_val_batches=1"
    )
    if dirpath is None:
        short_error(
            outcome,
            f"but an earlier run saved {last}: with a logger",
            f"HINT: resume from that file (--ckpt_path {last})",
        )
        assert "Set `ModelCheckpoint(..., save_last=True)`" not in outcome.text
        assert len(list(tmp_path.rglob("version_*"))) == 1  # refused before the run started
    else:
        assert outcome.code == 0, outcome.text[-3000:]
        assert "not pruned again" in outcome.text
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4


def with_a_changed_bit(checkpoint: Path, damaged: Path) -> tuple[zipfile.ZipInfo, bytes]:
    """Write ``checkpoint`` to ``damaged`` with one bit changed in the middle of its largest entry (a stored weight);
    return that entry and the damaged bytes."""
    with zipfile.ZipFile(checkpoint) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(checkpoint.read_bytes())
    header = 30 + int.from_bytes(data[largest.header_offset + 26 : largest.header_offset + 28], "little")
    header += int.from_bytes(data[largest.header_offset + 28 : largest.header_offset + 30], "little")
    data[largest.header_offset + header + largest.file_size // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    return largest, bytes(data)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SIGTERMException])
def test_a_stop_while_a_checkpoint_is_written_is_the_stop_and_leaves_the_previous_file(tmp_path, monkeypatch, stop):
    """A KeyboardInterrupt (Ctrl+C) or SIGTERMException (SIGTERM outside the Trainer's loops) inside torch.save's writes
    came out as torch's RuntimeError ("unexpected pos"), which neither Lightning nor the command takes for a stop: the
    run ended with a traceback and status 1 instead of 130 or 143."""
    target = tmp_path / "last.ckpt"
    WholeFileCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    before = target.read_bytes()
    writes = []

    def interrupted_at_the_third_write(checkpoint, stream):
        class Interrupting:  # the file atomic_file opened, with Ctrl+C pressed during the third write
            def __getattr__(self, name):
                return getattr(stream, name)

            def write(self, data):
                writes.append(len(data))
                if len(writes) == 3:
                    raise stop
                return stream.write(data)

        real_save(checkpoint, Interrupting())

    real_save = torch.save
    monkeypatch.setattr(torch, "save", interrupted_at_the_third_write)
    with pytest.raises(stop):
        WholeFileCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4096.0)}}, target)
    assert len(writes) == 3
    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_a_damaged_checkpoint_is_refused_when_the_trainer_loads_it(tmp_path):
    """``trainer.fit(..., ckpt_path=...)`` from Python goes through the Trainer's checkpoint IO, not the command."""
    checkpoint = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"weight": torch.arange(4096.0)}}, checkpoint)
    io = WholeFileCheckpointIO()
    assert torch.equal(io.load_checkpoint(checkpoint)["state_dict"]["weight"], torch.arange(4096.0))
    found_whole = checkpoint.stat().st_mtime_ns
    largest, _ = with_a_changed_bit(checkpoint, checkpoint)  # the same file, changed after it was found whole
    os.utime(checkpoint, ns=(found_whole + 10**9, found_whole + 10**9))  # on a filesystem of coarse times too
    with pytest.raises(ValueError, match=f"is damaged: {largest.filename} does not match what the Trainer wrote"):
        io.load_checkpoint(checkpoint)
    trainer = EcoflapTrainer(**TRAINER)
    assert isinstance(trainer.strategy.checkpoint_io, WholeFileCheckpointIO)


def test_a_checkpoint_with_a_changed_byte_is_refused_before_it_is_loaded(capsys, tmp_path, demo_data, pruned_run):
    """torch.load does not check the archive's checksums: a changed byte inside a weight loaded as a wrong value."""
    checkpoint, _ = pruned_run
    damaged = tmp_path / "damaged.ckpt"
    largest, data = with_a_changed_bit(checkpoint, damaged)

    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), f"--ckpt_path={damaged}")
    short_error(outcome, f"`ckpt_path` '{damaged}' is damaged: {largest.filename} does not match", "HINT")
    assert damaged.read_bytes() == bytes(data)


@pytest.mark.parametrize("kept", [0.05, 0.5, 0.999])
def test_a_checkpoint_cut_short_is_refused(capsys, tmp_path, demo_data, pruned_run, kept):
    checkpoint, _ = pruned_run
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * kept)])
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), f"--ckpt_path={cut}")
    short_error(outcome, f"`ckpt_path` '{cut}' cannot be read as a Lightning checkpoint", "not a complete zip archive")


def test_checkpoints_are_written_in_their_own_folder_not_through_the_temporary_folder(tmp_path, monkeypatch):
    """Lightning wrote each checkpoint to the system's temporary folder and moved it: across filesystems (a local /tmp,
    checkpoints on a network filesystem) a copy into the final name, which a kill cuts short (a 0-byte epoch=1.ckpt
    was seen on a tmpfs)."""
    trainer = EcoflapTrainer(**TRAINER, default_root_dir=tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, WholeFileCheckpointIO)

    def no_temporary_folder(*args, **kwargs):
        raise AssertionError("the checkpoint went through the temporary folder")

    monkeypatch.setattr(tempfile, "mkstemp", no_temporary_folder)
    target = tmp_path / "checkpoints" / "last.ckpt"
    trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert torch.equal(torch.load(target)["state_dict"]["w"], torch.ones(3))
    assert [path.name for path in target.parent.iterdir()] == ["last.ckpt"]


STOPPED_WHILE_PICKLED = """
import os, signal, sys, time, torch
from ecoflap_pl.cli import EcoflapTrainer

class StopsTheWriter:
    def __reduce__(self):
        if sys.argv[3] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("writing", flush=True)
        time.sleep(120)

trainer = EcoflapTrainer(accelerator="cpu", devices=1, logger=False, default_root_dir=sys.argv[1])
weights = {"w": torch.full((1000,), 2.0), "then": StopsTheWriter()}  # stopped after the tensor's record is written
trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": weights}, sys.argv[2])
"""


def killed_while_writing(tmp_path: Path, target: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_PICKLED, str(tmp_path), str(target), "kill"],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]


def test_a_kill_while_a_checkpoint_is_replaced_leaves_the_previous_one_whole(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1000)}}, target)
    before = target.read_bytes()
    killed_while_writing(tmp_path, target)
    assert target.read_bytes() == before
    leftovers = [path.name for path in target.parent.iterdir() if path != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ecoflap-checkpoint-"), leftovers
    assert "last" not in leftovers[0]  # never taken for the last checkpoint by ModelCheckpoint


def test_the_next_checkpoint_removes_what_a_killed_write_left_but_not_a_running_write(tmp_path):
    """A kill mid-write left a hidden file the size of a checkpoint in the folder for good (several GB each time a
    large run was preempted)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    killed_while_writing(tmp_path, folder / "epoch=0.ckpt")
    left_by_the_kill = set(folder.glob(".ecoflap-checkpoint-*.partial"))
    writer = subprocess.Popen(
        [sys.executable, "-c", STOPPED_WHILE_PICKLED, str(tmp_path), str(folder / "epoch=1.ckpt"), "hold"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        running = set(folder.glob(".ecoflap-checkpoint-*.partial")) - left_by_the_kill
        assert len(left_by_the_kill) == 1 and len(running) == 1

        WholeFileCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, folder / "epoch=2.ckpt")
        assert set(folder.glob(".ecoflap-checkpoint-*.partial")) == running
        assert torch.equal(torch.load(folder / "epoch=2.ckpt")["state_dict"]["w"], torch.ones(3))
    finally:
        writer.kill()
        writer.wait()


def fitted_checkpoint(tmp_path: Path) -> Path:
    """A pruned toy task's checkpoint after 2 steps of AdamW, written by a plain Trainer."""
    trainer = quiet_trainer(
        callbacks=[ECoFLaPPruning(**FAST, stages=["fit"])], max_steps=2, limit_val_batches=0, default_root_dir=tmp_path
    )
    trainer.fit(ToyTask(), datamodule=ToyData())
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    return tmp_path / "fitted.ckpt"


def test_a_damaged_checkpoint_given_to_a_plain_trainer_with_the_callback_is_refused_before_it_is_loaded(tmp_path):
    """A plain ``lightning.Trainer`` (not the command's) loaded a changed byte as a wrong weight; with the pruning
    callback its loading now checks the file whole before any of it is restored."""
    damaged = tmp_path / "damaged.ckpt"
    largest, data = with_a_changed_bit(fitted_checkpoint(tmp_path), damaged)
    task = ToyTask(seed=1)
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    callback = ECoFLaPPruning(**FAST, stages=["validate"])
    trainer = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=f"is damaged: {largest.filename} does not match what the Trainer wrote"):
        trainer.validate(task, datamodule=ToyData(), ckpt_path=damaged)
    assert all(torch.equal(task.state_dict()[name], tensor) for name, tensor in before.items())
    assert not callback.pruned and damaged.read_bytes() == data


def test_a_checkpoint_checked_by_the_command_is_not_read_again_when_the_trainer_loads_it(tmp_path, monkeypatch):
    checkpoint = fitted_checkpoint(tmp_path)
    with zipfile.ZipFile(checkpoint) as archive:
        entries = len(archive.infolist())
    opened: list[str] = []
    open_entry = zipfile.ZipFile.open

    def counted(self, name, *args, **kwargs):
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return open_entry(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counted)
    check_checkpoint_file(checkpoint)  # as `ecoflap` does before the model is built
    assert len(opened) == entries
    for trainer_class in (EcoflapTrainer, pl.Trainer):
        callbacks = [ECoFLaPPruning(**FAST, stages=["validate"])]
        trainer = quiet_trainer(trainer_class, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.validate(ToyTask(seed=1), datamodule=ToyData(), ckpt_path=checkpoint)
        assert isinstance(trainer.strategy.checkpoint_io, WholeFileCheckpointIO)
    assert len(opened) == entries


@pytest.mark.parametrize("dirpath", ["given", "default"])
def test_a_checkpoint_folder_without_room_for_one_checkpoint_is_refused_before_pruning(tmp_path, monkeypatch, dirpath):
    """The first checkpoint is written after the first epoch: a full disk was found only after pruning and training."""
    folder = tmp_path / "ckpts" if dirpath == "given" else tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    full = shutil.disk_usage(tmp_path)._replace(free=64)  # a disk with 64 bytes left: less than the toy's weights
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: full)
    task = ToyTask()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    callback = ECoFLaPPruning(**FAST, stages=["fit"])
    checkpoints = [ModelCheckpoint(dirpath=folder)] if dirpath == "given" else []
    trainer = quiet_trainer(
        callbacks=[callback, *checkpoints],
        enable_checkpointing=True,
        max_steps=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        logger=pl.loggers.CSVLogger(tmp_path, name="lightning_logs") if dirpath == "default" else False,
    )
    refused = (
        f"`ModelCheckpoint.dirpath` is '{folder}': one checkpoint (a lower bound: the model's state dict, the "
        "callbacks' state and a resumed run's optimizer state) takes at least 74.89 KiB there, and the filesystem of "
    )
    with pytest.raises(OSError, match=re.escape(refused) + ".* has 64 bytes free; nothing was written. HINT: free"):
        trainer.fit(task, datamodule=ToyData())
    assert not callback.pruned and trainer.global_step == 0
    assert all(torch.equal(task.state_dict()[name], tensor) for name, tensor in before.items())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_checkpoint_bound_is_below_the_size_of_a_checkpoint_written(tmp_path):
    """Resumed with AdamW's moments: the bound counts them (about three times the weights), and stays below the file."""
    checkpoint = fitted_checkpoint(tmp_path)
    callback = ECoFLaPPruning(**FAST, stages=["fit"])
    bounds: list[int] = []

    class Bound(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            bounds.append(least_checkpoint_bytes(trainer, callback.masks))
            bounds.append(least_checkpoint_bytes(trainer, callback.masks, weights_only=True))

    trainer = quiet_trainer(callbacks=[callback, Bound()], max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(ToyTask(seed=1), datamodule=ToyData(), ckpt_path=checkpoint)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in trainer.lightning_module.state_dict().values())
    assert bounds[1] == weights and 3 * weights < bounds[0] < checkpoint.stat().st_size
