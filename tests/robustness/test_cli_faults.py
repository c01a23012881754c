"""Bad inputs given to ``ecoflap`` (the console entry point, in this process) and pruned checkpoints evaluated
again: a refused run ends with a short message naming the problem and leaves the user's files as they were; a
pruned checkpoint is evaluated as it is (see ``CASES.md``)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Blip2ForConditionalGeneration

from ecoflap_pl.cli import main
from ecoflap_pl.pruning import PruningConfig, prune
from ecoflap_pl.reporting import write_report
from tests.pruning.pruning_helpers import seeded_toy_model, toy_batches, toy_loss
from tests.robustness.cli_runs import folder_digest, run_ecoflap, vit_config, vqa_config


def short_error(outcome, *expected: str) -> None:
    assert outcome.code == 2, outcome.text[-3000:]
    error = outcome.text[outcome.text.index("error (") : outcome.text.index("(ECOFLAP_DEBUG=1")]
    assert len(error.strip().splitlines()) <= 6, error  # the message and the valid values, if any
    for text in expected:
        assert text in error, error


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--pruning.sparsity=abc"], ['Parser key "pruning.sparsity"', "Got value: abc"]),
        (["--pruning.sparsity=1.5"], ["`sparsity` must be in [0, 1)", "HINT"]),
        (["--pruning.method=wandaa"], ["`method` must be one of ['wanda', 'sparsegpt', 'magnitude']"]),
        (["--pruning.allocation=unifrom"], ["`allocation` must be one of", "HINT: did you mean 'uniform'?"]),
        (["--pruning.method=sparsgpt"], ["`method` must be one of", "HINT: did you mean 'sparsegpt'?"]),
        (["--pruning.score=grad-ony"], ["`score` must be one of", "got 'grad-ony'. HINT: did you mean 'grad_only'?"]),
        (["--pruning.method=obs"], ["`method` must be one of", "HINT: register a new fine-step method with"]),
        (
            ["--pruning.sparsty=0.5"],
            ["unrecognized arguments: --pruning.sparsty=0.5", "did you mean 'pruning.sparsity'"],
        ),
        (
            ["--data.init_args.batch_sise=2"],
            ["Option 'batch_sise' is not accepted", "HINT: did you mean 'batch_size'?"],
        ),
        (["--model.init_args.num_beam=2"], ["Option 'num_beam' is not accepted", "HINT: did you mean 'num_beams'?"]),
        (["--pruning.zzz=1"], ["unrecognized arguments: --pruning.zzz=1"]),
        (["--pruning.sparsity_type=2:4"], ["HINT: did you mean 'pruning.structure'? (sparsity_type is its name in"]),
        (["--pruning.sparsity_ratio=0.5"], ["HINT: did you mean 'pruning.sparsity'? (sparsity_ratio is its name in"]),
        (["--pruning.stages=[train]"], ["`stages` must be a subset of"]),
        (["--data.init_args.batch_size=0"], ["`batch_size` must be an int >= 1, got 0."]),
        (["--data.init_args.calibration_batch_size=-1"], ["`calibration_batch_size` must be an int >= 1"]),
        (["--model.init_args.pretrained=/no/such/dir/model"], ["'/no/such/dir/model' does not exist", "local path"]),
        (["--model.init_args.pretrained=./missing-model"], ["'./missing-model' does not exist"]),
        (["--compare_dense=maybe"], ['Parser key "compare_dense"']),
        (
            ["--model.init_args.max_memory=10GB"],
            ["Expected a <class 'dict'>", "HINT: `max_memory` is a mapping, e.g. --model.init_args.max_memory '{cpu:"],
        ),
        (["--trainer.precision=17"], ["precision"]),
        (["--trainer.devices=0"], ["`Trainer(devices='0')` value is not a valid input"]),
        (["--trainer.limit_val_batches=0"], ["`trainer.limit_val_batches` is 0", "would evaluate nothing"]),
    ],
)
def test_configuration_errors_are_one_message(capsys, tmp_path, demo_data, blip2_dir, options, expected):
    config = vqa_config(tmp_path, demo_data, blip2_dir)
    before = folder_digest(blip2_dir)
    short_error(run_ecoflap(capsys, "validate", "-c", config, *options), *expected)
    assert folder_digest(blip2_dir) == before
    assert not (tmp_path / "run").exists()


def test_names_are_read_in_any_case_in_every_pruning_option(capsys, tmp_path, demo_data):
    """`--pruning.method Wanda` ran while `--pruning.allocation Uniform` was refused by the parser (a Literal type),
    without the valid names' hint."""
    config = vit_config(tmp_path, demo_data)
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--pruning.allocation=Uniform", "--pruning.method=Wanda")
    assert outcome.code == 0, outcome.text[-3000:]
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text(encoding="utf-8"))
    assert (report["config"]["allocation"], report["config"]["method"]) == ("uniform", "wanda")


def test_a_list_option_takes_one_name_without_brackets(capsys, tmp_path, demo_data):
    """`--pruning.stages validate` and `--pruning.exclude 'blocks.1.*'` were refused by the parser ("Expected a
    <class 'collections.abc.Sequence'>. Got value: validate"), though the callback reads one name as a list of one."""
    config = vit_config(tmp_path, demo_data)
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--pruning.stages=validate", "--pruning.exclude=blocks.1.*")
    assert outcome.code == 0, outcome.text[-3000:]
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text(encoding="utf-8"))
    assert report["config"]["exclude"] == ["blocks.1.*"]
    assert [block["block"] for block in report["blocks"]] == ["blocks.0"]


def test_an_unreadable_image_read_in_a_dataloader_worker_is_said_as_read_in_the_main_process(
    capsys, tmp_path, demo_data
):
    """With `num_workers > 0` (every experiment config), torch raised the error again as "Caught DataFormatError in
    DataLoader worker process 0." and the worker's traceback, causes first: the summary showed PIL's frames and
    "cannot identify image file", not the message naming the sample and the HINT."""
    data_dir = tmp_path / "imagenet"
    shutil.copytree(demo_data.imagenet, data_dir)
    image = sorted((data_dir / "val").glob("*/*.JPEG"))[0]
    image.write_bytes(b"not an image")
    options = [f"--data.init_args.data_dir={data_dir}", "--data.init_args.num_workers=2"]
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), *options)
    short_error(
        outcome,
        f"error (DataFormatError): Image {image} (for class {image.parent.name} (label 0)) cannot be read: cannot "
        f"identify image file '{image}'. HINT: images are read from `val_dir` ({data_dir / 'val'}).\n",
    )
    assert "Caught" not in outcome.text and "Traceback" not in outcome.text


def test_fit_prints_no_lightning_chatter(capsys, tmp_path, demo_data):
    config = vit_config(tmp_path, demo_data)
    outcome = run_ecoflap(capsys, "fit", "-c", config, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1")
    assert outcome.code == 0, outcome.text[-3000:]
    assert "Pruning report:" in outcome.text
    for chatter in ("to estimate number of stepping batches", "GPU available", "Seed set", "stopped:"):
        assert chatter not in outcome.text, chatter


def test_more_calibration_samples_than_the_training_split_holds_is_one_warning(capsys, tmp_path, demo_data):
    """The DataModule, the fine step and the coarse step each warned for this one cause: three lines, none naming the
    option to lower."""
    config = vit_config(tmp_path, demo_data, coarse_samples=50, fine_samples=100)  # the demo split holds 20
    outcome = run_ecoflap(capsys, "prune", "-c", config)
    assert outcome.code == 0, outcome.text[-3000:]
    assert [line for line in outcome.text.splitlines() if re.search(r"\bsamples?\b", line, re.IGNORECASE)] == [
        "Only 20 calibration samples were given, but `coarse_samples` is 50 and `fine_samples` is 100: both steps use "
        "all 20. HINT: lower `coarse_samples` and `fine_samples` to 20, or give more calibration samples."
    ]


def test_a_device_map_on_a_gpu_where_torch_sees_none_is_refused_before_the_model(
    capsys, tmp_path, demo_data, blip2_dir, monkeypatch
):
    """transformers failed inside torch as the model loaded ("Found no NVIDIA driver on your system", a RuntimeError
    with its traceback); `auto` alone places the model on the CPU there, and still runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, where a GPU might be there
    config = vqa_config(tmp_path, demo_data, blip2_dir)
    outcome = run_ecoflap(capsys, "validate", "-c", config, '--model.init_args.device_map={"": "cuda:0"}')
    short_error(
        outcome, "`device_map` {'': 'cuda:0'} puts weights on a CUDA GPU", "HINT: on the CPU, use device_map: cpu"
    )
    assert not (tmp_path / "run").exists()
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--model.init_args.device_map=auto")
    assert outcome.code == 0, outcome.text[-3000:]


def test_a_report_dir_that_is_a_file(capsys, tmp_path, demo_data):
    blocker = tmp_path / "report"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data, report_dir=str(blocker)))
    short_error(outcome, f"`report_dir` must be a directory, but '{blocker}' is a file. HINT")
    assert "Pruned " not in outcome.text  # refused before pruning, not when the report is written after it
    assert blocker.read_text(encoding="utf-8") == "a file, not a folder"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"PK\x03\x04" + bytes(100), "it is not a complete zip archive"),
        (b"not a checkpoint", "it is not a complete zip archive"),
    ],
    ids=["empty", "cut", "text"],
)
def test_an_unreadable_checkpoint_is_one_message(capsys, tmp_path, demo_data, content, reason):
    """The reason used to be torch's: nothing for an empty file, and for a text file advice to load it with
    `weights_only=False` (running its code)."""
    checkpoint = tmp_path / "broken.ckpt"
    checkpoint.write_bytes(content)
    config = vit_config(tmp_path, demo_data)
    for extra in ([], ["--compare_dense=true"]):
        outcome = run_ecoflap(capsys, "validate", "-c", config, f"--ckpt_path={checkpoint}", *extra)
        short_error(outcome, f"`ckpt_path` '{checkpoint}' cannot be read as a Lightning checkpoint: {reason}", "HINT")
        assert "weights_only" not in outcome.text
    assert checkpoint.read_bytes() == content


def test_a_missing_checkpoint(capsys, tmp_path, demo_data):
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--ckpt_path=/no/such.ckpt")
    short_error(outcome, "`ckpt_path` '/no/such.ckpt' does not exist. HINT: give a .ckpt file a run saved")


def test_mixed_precision_still_prunes(capsys, tmp_path, demo_data):
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--trainer.precision=16-mixed")
    assert outcome.code == 0, outcome.text[-3000:]
    assert "Using `precision='bf16-mixed'` instead" in outcome.text  # Lightning's own notice on a CPU
    report = json.loads(next((tmp_path / "run").rglob("pruning_report.json")).read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.03)


def test_compare_dense_refuses_a_pretrained_model_that_is_already_pruned(capsys, tmp_path, demo_data, blip2_dir):
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_dir)
    with torch.no_grad():
        for layer in model.language_model.model.decoder.layers:
            for linear in (layer.fc1, layer.fc2):
                linear.weight[:, ::2] = 0  # a model saved after pruning
    pruned_dir = tmp_path / "pruned-blip2"
    shutil.copytree(blip2_dir, pruned_dir)  # the processor files
    model.save_pretrained(pruned_dir)
    before = folder_digest(pruned_dir)
    config = vqa_config(tmp_path, demo_data, pruned_dir)
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--compare_dense=true")
    short_error(outcome, "`compare_dense` needs the dense model", "are already zero (pruned before)")
    assert folder_digest(pruned_dir) == before


def test_yaml_syntax_error_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("pruning:\n  sparsity: 0.5\n  stages: [validate\n", encoding="utf-8")
    short_error(run_ecoflap(capsys, "validate", "-c", str(bad)), f"{bad}, line 4", "is not valid YAML")


def test_a_misspelt_key_in_the_config_file_names_the_option_meant(capsys, tmp_path, demo_data):
    path = tmp_path / "config.yaml"
    path.write_text(Path(vit_config(tmp_path, demo_data)).read_text().replace("fine_samples", "fine_sampels"))
    outcome = run_ecoflap(capsys, "validate", "-c", str(path))
    short_error(outcome, "does not accept option 'pruning.fine_sampels'", "HINT: did you mean 'pruning.fine_samples'?")


def test_the_config_a_validate_run_saved_runs_prune_once_its_validate_option_is_deleted(capsys, tmp_path, demo_data):
    """A run saves its merged config as config.yaml (and --print_config prints it) with its subcommand's options:
    `verbose` of validate given to prune or fit was "does not accept option 'verbose'. HINT: did you mean 'verbose'?",
    and prune refused `weights_only`, which fit takes."""
    assert run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data)).code == 0
    saved = tmp_path / "run" / "config.yaml"
    assert "\nverbose: true\n" in saved.read_text(encoding="utf-8") and "weights_only" in saved.read_text()
    for subcommand in ("prune", "fit"):
        outcome = run_ecoflap(capsys, subcommand, "-c", str(saved))
        short_error(
            outcome,
            f"'verbose' is an option of `validate` and `test`, not of `{subcommand}`",
            f"HINT: delete its `verbose:` line, or print the config again with `ecoflap {subcommand} ...",
        )
        assert "did you mean" not in outcome.text
    edited = tmp_path / "for_prune.yaml"
    edited.write_text(saved.read_text(encoding="utf-8").replace("\nverbose: true\n", "\n"), encoding="utf-8")
    outcome = run_ecoflap(capsys, "prune", "-c", str(edited), f"--pruning.save_to={tmp_path / 'pruned'}")
    assert outcome.code == 0, outcome.text[-3000:]
    assert (tmp_path / "pruned" / "model.safetensors").is_file()


@pytest.mark.parametrize(("section", "typo"), [("pruning", "pruneing"), ("trainer", "trainr")])
def test_a_misspelt_section_in_the_config_file_names_the_section_meant(capsys, tmp_path, demo_data, section, typo):
    """A misspelt section name gave no hint: the hint looked for options of the misspelt section only."""
    path = tmp_path / "config.yaml"
    path.write_text(Path(vit_config(tmp_path, demo_data)).read_text().replace(f"\n{section}:", f"\n{typo}:"))
    outcome = run_ecoflap(capsys, "validate", "-c", str(path))
    short_error(outcome, f"does not accept option '{typo}.", f"HINT: did you mean '{section}.")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"pruning": {"compare_dense": True}},
            "HINT: did you mean 'compare_dense'? `compare_dense` is not an option of the `pruning:` section.",
        ),
        (
            {"trainer": {"ckpt_path": "last"}},
            "HINT: did you mean 'ckpt_path'? `ckpt_path` is not an option of the `trainer:` section.",
        ),
        (
            {"trainer": {"seed_everything": 3}},
            "HINT: did you mean 'seed_everything'? `seed_everything` is not an option of the `trainer:` section.",
        ),
        (
            {"data": {"init_args": {"sparsity": 0.3}}},
            "HINT: did you mean 'pruning.sparsity'? `sparsity` is not an argument of ImageNetDataModule.",
        ),
    ],
)
def test_an_option_in_another_section_than_its_own_names_its_section(capsys, tmp_path, demo_data, section, expected):
    """An option of another section (a top-level one under `pruning:` or `trainer:`, a pruning one among the data's
    arguments) was refused without a hint: the hint looked only among the options of the section it was put in."""
    config = yaml.safe_load(Path(vit_config(tmp_path, demo_data)).read_text(encoding="utf-8"))
    name, settings = next(iter(section.items()))
    settings = {"init_args": {**config[name]["init_args"], **settings["init_args"]}} if name == "data" else settings
    config[name] = {**config[name], **settings}
    path = tmp_path / "misplaced.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    short_error(run_ecoflap(capsys, "validate", "-c", str(path)), expected)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (
            "--model=ecoflap_pl.tasks.VQATsk",
            "HINT: did you mean 'ecoflap_pl.tasks.VQATask'? The tasks: ecoflap_pl.tasks.{",
        ),
        (
            "--data=ecoflap_pl.datamodules.ImageNetDataModul",
            "HINT: did you mean 'ecoflap_pl.datamodules.ImageNetDataModule'? The DataModules: ecoflap_pl.datamodules.{",
        ),
        ("--model.help=DemoVQATsk", "HINT: did you mean 'ecoflap_pl.demo.tasks.DemoVQATask'? The tasks: "),
        ("--model=my_tasks.Task", "HINT: The tasks: ecoflap_pl.tasks.{CaptioningTask, ClassificationTask, "),
    ],
)
def test_a_task_or_datamodule_class_not_found_lists_the_classes(capsys, tmp_path, demo_data, option, expected):
    """A misspelt class (`--model`, `class_path:`, `--model.help`) or one that cannot be imported was "module
    'ecoflap_pl.tasks' has no attribute 'VQATsk'" or "Expected a dot import path string: DemoVQATsk": no class named,
    nor where the classes are."""
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), option)
    short_error(
        outcome,
        expected,
        "ecoflap_pl.demo.tasks.{DemoCaptioningTask, DemoClassificationTask, DemoVQATask}"
        if "--model" in option
        else "ecoflap_pl.demo.datamodules.{",
    )


def test_the_demo_classes_resolve_by_their_short_names(tmp_path):
    """`ecoflap validate --model.help DemoVQATask` was "Expected a dot import path string: DemoVQATask" (the library's
    `--model.help VQATask` worked): jsonargparse finds a short name among the subclasses imported, and the demo's
    module was imported only once a config named one of its classes by its import path. A new process, so that no
    earlier test has imported it."""
    command = [sys.executable, "-m", "ecoflap_pl", "validate", "--model.help=DemoVQATask"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Help for --model.help=ecoflap_pl.demo.tasks.DemoVQATask" in done.stdout
    assert "--model.num_beams" in done.stdout


def test_compare_dense_given_to_a_subcommand_that_does_not_evaluate_says_it_is_ignored(capsys, tmp_path, demo_data):
    """`--compare_dense true` (the demo ViT config sets it) was silently ignored by `prune`, `fit` and `predict`."""
    outcome = run_ecoflap(
        capsys, "prune", "-c", vit_config(tmp_path, demo_data), "--compare_dense=true", "--pruning.progress=false"
    )
    assert outcome.code == 0, outcome.text[-3000:]
    assert (
        "`compare_dense` is ignored by `prune`: it evaluates the dense model beside the pruned one in" in outcome.text
    )
    assert "HINT: run `ecoflap validate` (or `test`) with this config to compare them" in outcome.text
    assert "Dense vs pruned" not in outcome.text


def test_a_pruning_callback_under_trainer_callbacks_is_refused_before_the_model(capsys, tmp_path, demo_data):
    """`--trainer.callbacks+=ecoflap_pl.callbacks.ECoFLaPPruning` (where a LightningCLI config puts callbacks) ended
    in a traceback once the data was read and the model built: Lightning's "Found more than one stateful callback of
    type `ECoFLaPPruning`" beside the one of the `pruning:` section, exit status 1."""
    option = "--trainer.callbacks+=ecoflap_pl.callbacks.ECoFLaPPruning"
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), option)
    short_error(
        outcome,
        "`trainer.callbacks` holds ecoflap_pl.callbacks.ECoFLaPPruning, but the pruning callback is configured by the "
        "`pruning:` section, which adds it to every run. HINT: remove it from trainer.callbacks and put its init_args "
        "under `pruning:`",
    )
    assert "Traceback" not in outcome.text and not (tmp_path / "run").exists()


def test_a_config_given_before_the_subcommand_says_to_give_it_after(capsys, tmp_path, demo_data):
    """`ecoflap -c FILE validate` was refused as "Option 'model.class_path' is not accepted before subcommand
    'validate'" (or the first option of the file), without how to give it."""
    outcome = run_ecoflap(capsys, "-c", vit_config(tmp_path, demo_data), "validate")
    short_error(
        outcome,
        "is not accepted before subcommand 'validate'",
        "HINT: give the config after the subcommand, `ecoflap validate -c FILE`: before it, a config must hold each "
        "subcommand's settings under the subcommand's name (`validate:`).",
    )


def test_a_default_root_dir_that_cannot_be_made_is_refused_before_the_model(capsys, tmp_path, demo_data):
    """A `trainer.default_root_dir` below a file was "error (NotADirectoryError): [Errno 20] Not a directory: ...",
    without the option, raised when Lightning first wrote the run's config.yaml there: once the data was read and the
    model built."""
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    option = f"--trainer.default_root_dir={blocker / 'runs'}"
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), option)
    short_error(
        outcome,
        f"`trainer.default_root_dir` is '{blocker / 'runs'}', but {blocker} is a file, so no folder can be made below "
        "it. HINT: choose a path whose parents are folders.",
    )
    assert "Validation" not in outcome.text and "ECoFLaP:" not in outcome.text


def test_a_section_file_that_names_its_section_again_says_to_give_it_with_c(capsys, tmp_path, demo_data):
    """`--pruning configs/pruning/wanda.yaml` (a whole config, its settings under `pruning:`) was refused as "does not
    accept option 'pruning.pruning.sparsity'" without a hint."""
    wanda = Path(__file__).parents[2] / "configs" / "pruning" / "wanda.yaml"
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--pruning", str(wanda))
    short_error(
        outcome,
        "does not accept option 'pruning.pruning.sparsity'",
        "HINT: a file given as `--pruning FILE` holds the settings of the `pruning:` section alone; this one names the "
        "section again: give it with -c instead",
    )


def test_a_command_line_without_a_subcommand_or_a_config_says_how_a_run_is_given(capsys, tmp_path, demo_data):
    """`ecoflap` alone, `ecoflap fit` alone and a config without its `data:` section named what was missing, not how a
    run is given."""
    short_error(run_ecoflap(capsys), 'expected "subcommand" to be one of', "HINT: name a subcommand and a config")
    how = "HINT: a run needs its task (`model:`) and its data (`data:`): give a config that names both, e.g. `ecoflap"
    short_error(run_ecoflap(capsys, "fit"), "arguments are required: fit.data, fit.model", how, "`ecoflap fit --help`")
    without_data = tmp_path / "without_data.yaml"
    config = yaml.safe_load(Path(vit_config(tmp_path, demo_data)).read_text(encoding="utf-8"))
    without_data.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "data"}), encoding="utf-8")
    short_error(run_ecoflap(capsys, "validate", "-c", str(without_data)), "required: validate.data\n", how)


def test_an_argument_of_a_base_class_the_class_does_not_take_is_not_suggested_back(capsys):
    """The demo's DataModule takes no `data_dir` (it builds its own files; its base class takes one): the hint said
    "did you mean 'data_dir'?" to `--data.init_args.data_dir`."""
    config = str(Path(__file__).parents[2] / "configs" / "demo" / "vit_imagenet.yaml")
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--data.init_args.data_dir=/elsewhere")
    short_error(
        outcome,
        "Option 'data_dir' is not accepted",
        "HINT: DemoImageNetDataModule does not take `data_dir`, though a class it derives from does: `--data.help "
        "ecoflap_pl.demo.datamodules.DemoImageNetDataModule` lists the arguments it takes.",
    )
    assert "did you mean" not in outcome.text


def test_a_pruning_section_given_as_a_file_of_its_own_is_read(capsys, tmp_path, demo_data):
    """`--pruning FILE` (a section's own config file: `--help` lists `--pruning CONFIG`, as `--trainer CONFIG`) was
    refused with "ECoFLaPPruning.__init__() got an unexpected keyword argument '__path__'", jsonargparse's note of
    where the section came from."""
    section = tmp_path / "pruning.yaml"
    section.write_text("sparsity: 0.3\nallocation: uniform\n", encoding="utf-8")
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), "--pruning", str(section))
    assert outcome.code == 0, outcome.text[-3000:]
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text(encoding="utf-8"))
    assert (report["config"]["sparsity"], report["config"]["allocation"]) == (0.3, "uniform")
    assert report["config"]["coarse_samples"] == 4  # the -c file's other settings are kept


def test_missing_config_file(capsys, tmp_path):
    short_error(run_ecoflap(capsys, "validate", "-c", str(tmp_path / "nope.yaml")), "File does not exist")


def _vqa_config_without_questions(tmp_path, demo_data, blip2_dir, split):
    """The VQA config with the ``split`` (``"train"`` or ``"val"``) questions file replaced by one without questions."""
    questions = json.loads((demo_data.coco / f"v2_OpenEnded_mscoco_{split}2014_questions.json").read_text())
    empty = tmp_path / "empty_questions.json"
    empty.write_text(json.dumps({**questions, "questions": []}))
    return vqa_config(tmp_path, demo_data, blip2_dir, {f"{split}_questions_file": str(empty)})


def test_empty_val_split_is_an_error_not_a_silent_success(capsys, tmp_path, demo_data, blip2_dir):
    config = _vqa_config_without_questions(tmp_path, demo_data, blip2_dir, "val")
    outcome = run_ecoflap(capsys, "validate", "-c", config)
    short_error(outcome, "the split read for the val loop has no samples")
    assert not list((tmp_path / "run").rglob("pruning_report.json"))  # refused before pruning


def test_empty_calibration_split_points_at_the_training_split(capsys, tmp_path, demo_data, blip2_dir):
    config = _vqa_config_without_questions(tmp_path, demo_data, blip2_dir, "train")
    outcome = run_ecoflap(capsys, "validate", "-c", config)
    short_error(outcome, "the split read for calibration and training has no samples")
    assert "coarse_samples" not in outcome.text  # a hint that cannot help is not given


def test_validate_with_stages_fit_says_nothing_is_pruned(capsys, tmp_path, demo_data):
    config = vit_config(tmp_path, demo_data, stages=["fit"])
    outcome = run_ecoflap(capsys, "validate", "-c", config, "--compare_dense=true")
    assert outcome.code == 0, outcome.text[-3000:]
    assert "`compare_dense` has nothing to compare: `pruning.stages` is ['fit']" in outcome.text
    assert "Dense vs pruned" not in outcome.text and "0.0% of the candidate weights pruned" not in outcome.text
    assert outcome.text.count("val/loss") == 1  # evaluated once
    plain = run_ecoflap(capsys, "validate", "-c", config)
    assert "so `validate` runs on the dense model (nothing is pruned)" in plain.text


def test_validate_with_no_stages_evaluates_the_model_as_it_is_without_a_warning(capsys, tmp_path, demo_data):
    """`stages: []` is chosen on purpose (the `dense` preset; a saved pruned model evaluated as saved): the warning
    it got called the model dense and hinted to add 'validate', which would prune a saved pruned model again."""
    outcome = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data, stages=[]))
    assert outcome.code == 0, outcome.text[-3000:]
    assert "`pruning.stages` is []: `validate` runs on the model as it is, without pruning." in outcome.text
    assert "HINT" not in outcome.text and "dense model" not in outcome.text


def test_test_on_an_unannotated_split_says_where_the_results_went(capsys, tmp_path, demo_data, blip2_dir):
    config = vqa_config(tmp_path, demo_data, blip2_dir, {"test_split": "test2015"}, stages=[])
    outcome = run_ecoflap(capsys, "test", "-c", config, "--trainer.limit_test_batches=1")
    assert outcome.code == 0, outcome.text[-3000:]
    results = tmp_path / "run" / "vqa_test_results.json"
    assert results.is_file()
    assert f"their predictions were written to {results}" in outcome.text


# --- a pruned, fine-tuned checkpoint evaluated again ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, demo_data):
    """``ecoflap fit`` of the tiny ViT: pruned to 50% at the start, two optimizer steps, one checkpoint."""
    tmp_path = tmp_path_factory.mktemp("pruned_run")
    config = vit_config(tmp_path, demo_data, importance="uniform")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["fit", "-c", config, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    callback = next(v for k, v in state["callbacks"].items() if "ECoFLaPPruning" in k)
    return checkpoint, callback["report"]["overall_sparsity"]


def test_a_pruned_checkpoint_is_evaluated_as_it_is(capsys, tmp_path, demo_data, pruned_run):
    checkpoint, sparsity = pruned_run
    digest = folder_digest(checkpoint.parent)
    config = vit_config(tmp_path, demo_data, importance="uniform", sparsity=0.7)  # other settings: warned, kept
    outcome = run_ecoflap(capsys, "validate", "-c", config, f"--ckpt_path={checkpoint}")
    assert outcome.code == 0, outcome.text[-3000:]
    assert f"({100 * sparsity:.1f}% of the candidate weights; masks from the checkpoint {checkpoint})" in outcome.text
    assert "not pruned again" in outcome.text
    assert not list((tmp_path / "run").rglob("pruning_report.json"))  # no second pruning
    assert folder_digest(checkpoint.parent) == digest


def test_compare_dense_with_a_pruned_checkpoint_evaluates_the_real_dense_model(capsys, tmp_path, demo_data, pruned_run):
    checkpoint, sparsity = pruned_run
    config = vit_config(tmp_path, demo_data, importance="uniform")
    dense = run_ecoflap(capsys, "validate", "-c", config, "--pruning.stages=[]").metric("val/loss")
    pruned = run_ecoflap(capsys, "validate", "-c", config, f"--ckpt_path={checkpoint}").metric("val/loss")
    assert dense != pruned
    both = run_ecoflap(capsys, "validate", "-c", config, f"--ckpt_path={checkpoint}", "--compare_dense=true")
    assert both.code == 0, both.text[-3000:]
    shown = " ".join(both.text.split())  # rich wraps long titles and captions to the terminal's width
    assert f"Dense vs pruned ({100 * sparsity:.1f}% of the candidate weights pruned)" in shown, both.text[-3000:]
    assert f"masks from the checkpoint {checkpoint}" in shown
    # The pruned column is of weights trained after pruning: it said only where the masks came from (CASES 239).
    assert "pruned: fine-tuned after pruning, to training step 2 (the masks held fixed)" in shown
    assert f"val/loss │ {dense:.4f} │ {pruned:.4f}" in shown


def test_a_checkpoint_of_another_model_config_is_rebuilt_as_trained(capsys, tmp_path, demo_data, pruned_run):
    checkpoint, _ = pruned_run
    same = run_ecoflap(capsys, "validate", "-c", vit_config(tmp_path, demo_data), f"--ckpt_path={checkpoint}")
    other = vit_config(tmp_path, demo_data, model={"embed_dim": 48})
    outcome = run_ecoflap(capsys, "validate", "-c", other, f"--ckpt_path={checkpoint}")
    assert outcome.code == 0, outcome.text[-3000:]
    assert "The checkpoint's hyperparameters replace these model arguments of the config: model_config" in outcome.text
    assert outcome.metric("val/loss") == same.metric("val/loss")


def occupied_folder(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("the user's file", encoding="utf-8")
    return occupied


@pytest.mark.parametrize("export", [False, True])
def test_prune_refusing_save_to_says_it_once(capsys, tmp_path, demo_data, export):
    """A save_to refused at setup was followed by a warning that '`fit` stopped before pruning finished' (the user
    ran `prune`, and nothing had started): the refusal alone is the message. An earlier export there is refused when
    the stage starts, before pruning, as plainly."""
    occupied = occupied_folder(tmp_path)
    if export:
        (occupied / "pruning_report.json").write_text("{}", encoding="utf-8")
    before = folder_digest(occupied)
    outcome = run_ecoflap(capsys, "prune", "-c", vit_config(tmp_path, demo_data, save_to=str(occupied)))
    short_error(outcome, "a folder that is not empty; nothing was written")
    assert "stopped" not in outcome.text, outcome.text
    assert folder_digest(occupied) == before


@pytest.mark.parametrize(
    ("pruning", "expected"),
    [
        ({"allocation": "from_report", "allocation_report": "/no/such/pruning_report.json"}, "is not a file. HINT"),
        ({"exclude": ["*"]}, "select no weight to prune"),
        ({"report_dir": "/proc/ecoflap-report"}, "`report_dir` is '/proc/ecoflap-report', but /proc cannot be written"),
    ],
    ids=["missing-allocation-report", "patterns-selecting-nothing", "report-dir-taking-no-entry"],
)
def test_compare_dense_refuses_bad_pruning_settings_before_the_dense_evaluation(
    capsys, tmp_path, demo_data, pruning, expected
):
    """Each was refused only when pruning began, after the dense model had been evaluated (minutes on a real model);
    the unwritable report_dir only after pruning itself."""
    logs = tmp_path / "logs"  # a dense evaluation would log its metrics here
    outcome = run_ecoflap(
        capsys,
        "validate",
        "-c",
        vit_config(tmp_path, demo_data, **pruning),
        "--compare_dense=true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logs}",
    )
    short_error(outcome, expected)
    assert not list(logs.rglob("metrics.csv"))


def test_compare_dense_refuses_the_report_of_another_model_before_the_dense_evaluation(capsys, tmp_path, demo_data):
    toy = prune(seeded_toy_model(), toy_batches(2), toy_loss, PruningConfig(importance="uniform", fine_samples=8))
    report = write_report(toy, tmp_path / "toy")["json"]
    logs = tmp_path / "logs"
    outcome = run_ecoflap(
        capsys,
        "validate",
        "-c",
        vit_config(tmp_path, demo_data, allocation="from_report", allocation_report=str(report)),
        "--compare_dense=true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logs}",
    )
    short_error(outcome, "was made for other groups", "only there: ['layers.0', 'layers.1', 'layers.2']", "HINT")
    assert not list(logs.rglob("metrics.csv"))


def test_a_checkpoint_of_another_task_is_refused(capsys, tmp_path, demo_data, blip2_dir, pruned_run):
    """A classification checkpoint given to the VQA config: Lightning built the checkpoint's task instead of the
    config's, and the run failed later on the data ('Classification val batches must carry `labels`')."""
    checkpoint, _ = pruned_run
    digest = folder_digest(checkpoint.parent)
    outcome = run_ecoflap(
        capsys, "validate", "-c", vqa_config(tmp_path, demo_data, blip2_dir), f"--ckpt_path={checkpoint}"
    )
    short_error(
        outcome,
        "was written by the task ecoflap_pl.tasks.ClassificationTask, but the config's model is "
        "ecoflap_pl.tasks.VQATask. HINT",
    )
    assert folder_digest(checkpoint.parent) == digest


@pytest.mark.parametrize("export", [False, True])
def test_compare_dense_refuses_a_bad_save_to_before_the_dense_evaluation(capsys, tmp_path, demo_data, export):
    occupied = occupied_folder(tmp_path)
    if export:  # an earlier run's export: `setup` leaves its emptiness to the stage's start, the command checks it
        (occupied / "pruning_report.json").write_text("{}", encoding="utf-8")
    before = folder_digest(occupied)
    config = vit_config(tmp_path, demo_data, save_to=str(occupied))
    logs = tmp_path / "logs"  # a dense evaluation would log its metrics here
    outcome = run_ecoflap(
        capsys,
        "validate",
        "-c",
        config,
        "--compare_dense=true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logs}",
    )
    short_error(outcome, "a folder that is not empty; nothing was written", "--pruning.overwrite true")
    assert not list(logs.rglob("metrics.csv"))  # refused before the dense model was evaluated
    assert folder_digest(occupied) == before


@pytest.mark.parametrize("subcommand", ["validate", "prune"])
def test_semi_structured_without_a_gpu_is_one_message(capsys, tmp_path, demo_data, blip2_dir, monkeypatch, subcommand):
    """It ended in a RuntimeError's traceback (validate), or a hint to fine-tune without it (prune), once the model was
    built (here a model whose weights file is cut, which loading it would report instead)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where tests run on a GPU one
    model = shutil.copytree(blip2_dir, tmp_path / "model")
    (model / "model.safetensors").write_bytes((blip2_dir / "model.safetensors").read_bytes()[:100])
    config = vqa_config(
        tmp_path, demo_data, model, structure="2:4", importance="uniform", semi_structured=True, save_to="pruned"
    )
    outcome = run_ecoflap(capsys, subcommand, "-c", config)
    short_error(outcome, "`semi_structured` needs a CUDA GPU", "torch sees no CUDA GPU on this machine. HINT")
    assert "Traceback" not in outcome.text
    assert not (tmp_path / "run").exists() and not (tmp_path / "pruned").exists()


@pytest.mark.parametrize(
    ("offload_folder", "expected"),
    [
        ("/proc/ecoflap-offload", "`offload_folder` is '/proc/ecoflap-offload', but /proc cannot be written"),
        ("a-file", "`offload_folder` must be a directory, but"),
    ],
    ids=["unwritable", "a-file"],
)
def test_an_offload_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    capsys, tmp_path, demo_data, blip2_dir, offload_folder, expected
):
    """It was Accelerate's bare "[Errno 2] No such file or directory: '/proc/…'" from inside from_pretrained."""
    (tmp_path / "a-file").write_text("user data", encoding="utf-8")
    config = vqa_config(tmp_path, demo_data, blip2_dir)
    placement = ["--model.init_args.device_map=auto", "--model.init_args.max_memory={cpu: 1KB}"]
    folder = offload_folder if offload_folder.startswith("/") else str(tmp_path / offload_folder)
    outcome = run_ecoflap(capsys, "prune", "-c", config, *placement, f"--model.init_args.offload_folder={folder}")
    short_error(outcome, expected, "HINT")
    assert (tmp_path / "a-file").read_text(encoding="utf-8") == "user data"


def test_prune_prints_no_model_summary_nor_logging_advice(capsys, tmp_path, demo_data):
    """`ecoflap prune` (a fit of zero steps) printed, after "Pruned model saved to ...", the summary of a model about to
    be trained and Lightning's advice to lower log_every_n_steps for an epoch that takes no step."""
    config = vit_config(tmp_path, demo_data, save_to=str(tmp_path / "pruned"))
    options = ["--trainer.enable_model_summary=true", "--trainer.logger=true"]
    outcome = run_ecoflap(capsys, "prune", "-c", config, *options)
    assert outcome.code == 0, outcome.text[-3000:]
    assert "Pruned model saved to" in outcome.text
    for chatter in ("Trainable params", "logging interval"):
        assert chatter not in outcome.text, chatter
