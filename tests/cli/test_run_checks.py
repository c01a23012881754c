"""What ``ecoflap`` checks before it builds the model, besides the data (test_data_check.py): the Trainer's hardware
settings (a GPU that is not there: every experiment file asks for one) and ``ckpt_path``, each one short configuration
error with a hint, not minutes of model loading followed by Lightning's one-line refusal; and what ``--help`` says."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoflap_pl.cli import SUBCOMMAND_HELP
from ecoflap_pl.cli_help import CKPT_PATH_HELP
from ecoflap_pl.demo.data import DemoPaths
from ecoflap_pl.export import load_pruned_state_dict
from tests.cli.test_data_check import config, refused
from tests.datamodules.datamodule_layouts import write_vqa
from tests.robustness import test_checkpoint_faults, test_cli_faults
from tests.robustness.cli_runs import run_ecoflap, vit_config

ROOT = Path(__file__).resolve().parents[2]
pruned_run = test_cli_faults.pruned_run  # a pruned, fine-tuned checkpoint (a module-scoped fixture)
pruned_checkpoints = test_checkpoint_faults.pruned_checkpoints  # the same, whole and weights-only


def test_an_experiment_file_on_a_machine_without_a_gpu_stops_before_the_model_with_a_hint(tmp_path: Path) -> None:
    # The shipped BLIP-2 OPT-2.7B experiment asks for a GPU; its model comes from the hub, offline here, so building
    # the model first would end with the hub's error (on a real machine: minutes of loading 15 GB first).
    data_dir = write_vqa(tmp_path / "vqa")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    args = ["validate", "-c", str(ROOT / "configs/experiments/blip2_opt27b_vqav2.yaml")]
    args += [f"--data.init_args.data_dir={data_dir}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    run = subprocess.run(
        [sys.executable, "-m", "ecoflap_pl.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr[run.stderr.index("error (") :]
    assert error.startswith("error (configuration error): The trainer settings (accelerator='gpu', devices=1"), error
    assert "HINT: torch sees no CUDA GPU here" in error
    assert "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto" in error
    assert len(error.splitlines()) <= 3, error
    assert "blip2-opt-2.7b" not in error and "offline" not in run.stdout + run.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf_home").exists()  # nothing written


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # configs/trainer/ddp.yaml's `devices: -1` (every GPU) with the CPU accelerator
        (["--trainer.accelerator", "cpu", "--trainer.devices", "-1"], "`devices` selected with `CPUAccelerator`"),
        (["--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp"], "FSDP"),
    ],
)
def test_trainer_settings_lightning_refuses_are_named_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, options: list[str], expected: str
) -> None:
    data_dir = write_vqa(tmp_path / "vqa")
    outcome = run_ecoflap(capsys, "validate", "-c", config(tmp_path, data_dir), *options)
    error = refused(outcome, "The trainer settings (accelerator='cpu'", expected, "HINT: fix trainer.accelerator")
    assert "do not fit this machine" in error
    assert not (tmp_path / "run").exists()


def test_a_refusal_under_ddp_on_several_cpu_processes_is_said_once(tmp_path: Path, demo_data: DemoPaths) -> None:
    """``--trainer.devices 3`` on the CPU starts three DDP processes; a calibration set too short for three ranks was
    refused by each of them after they started: the same error three times. It is refused before they start."""
    path = vit_config(tmp_path, demo_data)  # 4 coarse samples in batches of 4: one batch for three ranks
    output = _refused_fit_on_cpu_processes(tmp_path, path, devices=3)
    assert "Each of the 3 ranks needs at least one calibration batch" in output
    assert "HINT: raise `coarse_samples` (now 4)" in output
    assert "Initializing distributed" not in output  # refused before any process started


def test_a_save_to_holding_an_export_under_ddp_is_refused_once_before_the_processes_start(
    tmp_path: Path, demo_data: DemoPaths
) -> None:
    """`setup` leaves a `save_to` that holds an earlier export to the stage's start (a pruned checkpoint writes
    nothing): a run that prunes is refused by the command before DDP starts its processes, not once per rank."""
    occupied = tmp_path / "exported"
    occupied.mkdir()
    (occupied / "pruning_report.json").write_text("{}", encoding="utf-8")
    path = vit_config(tmp_path, demo_data, save_to=str(occupied))
    output = _refused_fit_on_cpu_processes(tmp_path, path, devices=2)
    assert "a folder that is not empty; nothing was written" in output
    assert "Initializing distributed" not in output  # refused before any process started
    assert [child.name for child in occupied.iterdir()] == ["pruning_report.json"]


def _refused_fit_on_cpu_processes(tmp_path: Path, config_path: str, devices: int, *options: str) -> str:
    """The output of ``ecoflap fit`` (with ``options``) under DDP on ``devices`` CPU processes, refused once, with
    status 2."""
    args = ["fit", "-c", config_path, f"--trainer.devices={devices}", "--trainer.max_epochs=1", *options]
    code, output = _ecoflap_process(tmp_path, *args)
    assert code == 2, output[-3000:]
    assert output.count("error (") == 1, output[-3000:]
    return output


def _ecoflap_process(tmp_path: Path, *args: str) -> tuple[int, str]:
    """The exit status and output of ``ecoflap ARGS`` run as a process of its own in ``tmp_path`` (which, under DDP on
    several CPU processes, starts the process of each other rank)."""
    run = subprocess.run(
        [sys.executable, "-m", "ecoflap_pl.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("source", ["checkpoint", "saved model"])
def test_fine_tuning_a_pruned_model_of_another_run_into_a_save_to_holding_an_export_under_ddp_is_refused_once(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    demo_data: DemoPaths,
    pruned_run: tuple[Path, float],
    source: str,
) -> None:
    """Whether `fit` may replace `save_to` depends on where the masks come from (a checkpoint of the run that wrote
    the export is resumed and replaces it), known to the callback only once the checkpoint is restored or the saved
    masks read: every DDP process refused it. The command reads the checkpoint's pruning report from the file, or
    sees the saved model, and refuses before the processes start."""
    occupied = tmp_path / "exported"
    occupied.mkdir()
    (occupied / "pruning_report.json").write_text('{"metadata": {"run": "another"}}', encoding="utf-8")
    if source == "checkpoint":
        options = [f"--ckpt_path={pruned_run[0]}"]
        path = vit_config(tmp_path, demo_data, save_to=str(occupied))
    else:
        saved = tmp_path / "pruned"
        assert run_ecoflap(capsys, "prune", "-c", vit_config(tmp_path, demo_data, save_to=str(saved))).code == 0
        model = {"pretrained_cfg_overlay": {"file": str(saved / "model.safetensors")}}
        path = vit_config(tmp_path, demo_data, model=model, save_to=str(occupied))
        options = ["--model.init_args.pretrained=true"]
    output = _refused_fit_on_cpu_processes(tmp_path, path, 2, *options, "--trainer.max_steps=3")
    assert "a folder that is not empty; nothing was written" in output
    assert "Initializing distributed" not in output  # refused before any process started
    assert [child.name for child in occupied.iterdir()] == ["pruning_report.json"]


def test_resuming_from_a_weights_only_last_checkpoint_under_ddp_is_refused_once(
    tmp_path: Path, demo_data: DemoPaths, pruned_run: tuple[Path, float]
) -> None:
    """`--ckpt_path last` is resolved when the run starts: each DDP process ended in Lightning's KeyError traceback.
    The command resolves it with Lightning's resolution and refuses the file it finds before the processes start."""
    checkpoint, _ = pruned_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del state["optimizer_states"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # where `vit_config`'s Trainer (no logger) looks
    last.parent.mkdir(parents=True)
    torch.save(state, last)
    path = vit_config(tmp_path, demo_data)
    output = _refused_fit_on_cpu_processes(tmp_path, path, 2, "--ckpt_path=last", "--trainer.max_steps=3")
    assert f"`ckpt_path` '{last}' holds the weights only" in output
    assert "Initializing distributed" not in output  # refused before any process started


@pytest.mark.distributed
def test_prune_from_a_weights_only_last_checkpoint_under_ddp_keeps_its_masks_and_saves_its_weights(
    tmp_path: Path, demo_data: DemoPaths, pruned_checkpoints: dict[str, Path]
) -> None:
    """`prune` restores a weights-only checkpoint without the optimizer state it never uses, in each DDP process (each
    runs the command, and restores the file, itself): the export holds the checkpoint's masks and weights."""
    weights_only = pruned_checkpoints["weights_only"]
    state = torch.load(weights_only, map_location="cpu", weights_only=False)
    masks = next(value for key, value in state["callbacks"].items() if "ECoFLaPPruning" in key)["masks"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # where `vit_config`'s Trainer (no logger) looks
    last.parent.mkdir(parents=True)
    shutil.copy(weights_only, last)
    path = vit_config(tmp_path, demo_data, save_to=str(tmp_path / "pruned"))
    code, output = _ecoflap_process(tmp_path, "prune", "-c", path, "--trainer.devices=2", "--ckpt_path=last")
    assert code == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output and "not pruned again" in output
    weights, saved_masks = load_pruned_state_dict(tmp_path / "pruned")
    assert saved_masks.keys() == masks.keys() and masks
    assert all(torch.equal(saved_masks[name], mask) for name, mask in masks.items())
    assert all(torch.equal(weight, state["state_dict"][f"model.{name}"]) for name, weight in weights.items())


def test_the_top_level_help_says_what_each_subcommand_does(capsys: pytest.CaptureFixture[str]) -> None:
    """``ecoflap --help`` said "Lightning Trainer command line tool", and its subcommands' one-line help is
    Lightning's ("Perform one evaluation epoch over the validation set."): nothing said that they prune first."""
    outcome = run_ecoflap(capsys, "--help")
    assert outcome.code == 0
    text = " ".join(outcome.text.split())
    assert "Lightning Trainer command line tool" not in text
    for said in ("`validate` and `test` prune, then evaluate", "`fit` prunes, then fine-tunes", "--pruning.save_to"):
        assert said in text, text[:2000]
    listing = text[text.index("Available subcommands:") :]
    for subcommand, said in SUBCOMMAND_HELP.items():
        assert f"{subcommand} {said}" in listing, listing
    for lightnings in ("Runs the full optimization routine", "evaluation epoch", "Run inference on your data"):
        assert lightnings not in listing, listing


def test_version_lists_the_package_and_the_libraries_a_bug_report_needs(capsys: pytest.CaptureFixture[str]) -> None:
    """``ecoflap --version`` was refused as an unknown argument."""
    outcome = run_ecoflap(capsys, "--version")
    assert outcome.code == 0
    lines = outcome.text.split("\n")
    for package in ("ecoflap-pl", "torch", "lightning", "transformers", "timm", "accelerate"):
        assert f"{package} {importlib.metadata.version(package)}" in lines, outcome.text


_THE_COMMAND_ALONE = """
import sys
from ecoflap_pl.entry_point import main
sys.argv = ["ecoflap", *sys.argv[1:]]
main()
print("imported:", sorted(name for name in ("torch", "lightning", "transformers", "timm") if name in sys.modules))
"""


@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_version_alone_answers_without_importing_the_command(rank: str | None, printed: bool) -> None:
    """``ecoflap --version`` imported torch, Lightning and transformers (7-10 s) to print six lines of metadata; the
    console script now answers it from the installed distributions, on launcher rank 0 only (as the full parser)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    env.update({} if rank is None else {"RANK": rank})
    outcome = subprocess.run(
        [sys.executable, "-c", _THE_COMMAND_ALONE, "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert outcome.returncode == 0, outcome.stderr
    versions = [f"{package} {importlib.metadata.version(package)}" for package in ("ecoflap-pl", "torch", "lightning")]
    assert all((version in outcome.stdout.splitlines()) is printed for version in versions), outcome.stdout
    assert outcome.stdout.splitlines()[-1] == "imported: []", outcome.stdout


@pytest.mark.parametrize(("debug", "python_format"), [({}, False), ({"ECOFLAP_DEBUG": "1"}, True)])
def test_a_warning_is_printed_in_one_line_unless_debugging(tmp_path, demo_data, debug, python_format):
    """The command printed its warnings in Python's format: `/…/callbacks/pruning.py:485: UserWarning: …` and then the
    line of source that raised it, `  rank_zero_warn(`. ``ECOFLAP_DEBUG=1`` keeps that format."""
    config = vit_config(tmp_path, demo_data)
    env = {key: value for key, value in os.environ.items() if key != "ECOFLAP_DEBUG"}
    env.update({"OMP_NUM_THREADS": "1", **debug})
    run = subprocess.run(
        [sys.executable, "-m", "ecoflap_pl", "validate", "-c", config, "--pruning.stages=[fit]"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    said = "UserWarning: `pruning.stages` is ['fit'], so `validate` runs on the dense model (nothing is pruned)."
    lines = run.stderr.splitlines()
    assert any(line.startswith(said) for line in lines) is not python_format, run.stderr[-3000:]
    assert ("pruning.py:" in run.stderr and "rank_zero_warn(" in run.stderr) is python_format, run.stderr[-3000:]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "prune"])
def test_each_subcommand_help_begins_with_what_it_does_here(
    capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    outcome = run_ecoflap(capsys, subcommand, "--help")
    assert outcome.code == 0
    text = " ".join(outcome.text.split())
    assert text.index(SUBCOMMAND_HELP[subcommand]) < text.index("options:"), text[:2000]


@pytest.mark.parametrize("subcommand", ["validate", "fit", "prune"])
def test_a_checkpoint_path_that_is_no_file_is_refused_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, subcommand: str
) -> None:
    """Lightning's "Checkpoint file not found: PATH" came when the run restored the checkpoint: after the model was
    built and, for validate, after pruning; a folder given as ``ckpt_path`` failed inside torch.load."""
    data_dir = write_vqa(tmp_path / "vqa")
    path = config(tmp_path, data_dir)
    outcome = run_ecoflap(capsys, subcommand, "-c", path, "--ckpt_path=/no/such.ckpt")
    refused(outcome, "`ckpt_path` '/no/such.ckpt' does not exist. HINT: give a .ckpt file a run saved")
    folder = tmp_path / "run_folder"
    folder.mkdir()
    outcome = run_ecoflap(capsys, subcommand, "-c", path, f"--ckpt_path={folder}")
    refused(outcome, f"`ckpt_path` '{folder}' is a folder, not a checkpoint file. HINT")
    assert not (tmp_path / "run").exists()


LIGHTNINGS_WORDS = (
    "Runs the full optimization routine",
    "Perform one evaluation epoch",
    "Run inference on your data",
    "from which training is resumed",
    "previous ``trainer.fit`` call",
    "If True, prints the",
    "Whether to return predictions",
    "Base class for all optimizers",
    "<class '",
    ":meth:`prune`",
)
"""What each subcommand's ``--help`` said in Lightning's words (the Trainer methods' docstrings, torch's and the
scheduler classes' tuple as group titles), all of it written for ``trainer.fit(model)`` in a script."""


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "prune"])
def test_each_subcommand_help_describes_its_options_in_its_own_words(
    capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    """Below its first line, ``ecoflap fit --help`` still headed ``--ckpt_path`` "Runs the full optimization routine"
    and described it as "the checkpoint from which training is resumed ... the previous ``trainer.fit`` call", which a
    command that builds its model from the config and reads pruned checkpoints does not do."""
    outcome = run_ecoflap(capsys, subcommand, "--help")
    assert outcome.code == 0
    text = " ".join(outcome.text.split())
    for lightnings in LIGHTNINGS_WORDS:
        assert lightnings not in text, text[text.find(lightnings) - 300 :][:1000]
    options = text[text.index(f"Options of `ecoflap {subcommand}`:") :]
    assert options.split(" --ckpt_path CKPT_PATH ")[1].startswith(CKPT_PATH_HELP[subcommand]), options[:1500]
    assert "One saved after pruning" in CKPT_PATH_HELP[subcommand]
    for group in ("Lightning's Trainer: the `trainer:` section:", "The optimizer of `fit`", "learning-rate schedule"):
        assert group in text, text[:3000]
