"""``ecoflap`` reads the splits a run reads before it builds the model: a wrong ``data_dir``, a missing or damaged
annotation file, a missing image folder or image file is one short configuration error, not minutes of model loading
followed by a traceback; the splits read are reused by the run, not read again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ecoflap_pl.datamodules import VQAv2DataModule
from ecoflap_pl.export import write_pruned_model
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.tasks import ClassificationTask, VQATask
from tests.datamodules.datamodule_layouts import write_vqa
from tests.robustness.cli_runs import TINY_VIT, TRAINER, Outcome, run_ecoflap, vit_config

ROOT = Path(__file__).resolve().parents[2]
BUILT = "NotBuiltTask was built"


class NotBuiltTask(VQATask):
    """A task that reports being built: a run refused for its data must stop before any model exists."""

    def __init__(self, pretrained: str = "Salesforce/blip2-opt-2.7b") -> None:
        raise ValueError(f"{BUILT} (pretrained={pretrained!r}): the data check let the run go on.")


class Tag:
    """A class argument of a DataModule (jsonargparse instantiates it from ``class_path``)."""

    def __init__(self, name: str) -> None:
        self.name = name


class TaggedVQAv2DataModule(VQAv2DataModule):
    """A DataModule taking a class argument, used in its constructor."""

    def __init__(self, data_dir: str, tag: Tag, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.tag_name = tag.name


def config(tmp_path: Path, data_dir: Path, data: dict[str, Any] | None = None, **pruning: Any) -> str:
    document = {
        "trainer": {**TRAINER, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": f"{__name__}.NotBuiltTask"},
        "data": data
        or {"class_path": "ecoflap_pl.datamodules.VQAv2DataModule", "init_args": {"data_dir": str(data_dir)}},
        "pruning": {"progress": False, **pruning},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


def refused(outcome: Outcome, *expected: str) -> str:
    """The one configuration error of a refused run, checked to hold ``expected`` and to come before the model."""
    assert outcome.code == 2, outcome.text[-3000:]
    error = outcome.text[outcome.text.index("error (configuration error): ") : outcome.text.index("(ECOFLAP_DEBUG=1")]
    assert len(error.strip().splitlines()) <= 2, error
    for text in expected:
        assert text in error, error
    assert BUILT not in outcome.text
    return error


def went_on_to_the_model(outcome: Outcome) -> None:
    assert outcome.code == 2 and BUILT in outcome.text, outcome.text[-3000:]


@pytest.fixture
def vqa_root(tmp_path: Path) -> Path:
    return write_vqa(tmp_path / "vqa")


def test_the_experiment_config_with_a_wrong_data_dir_stops_before_the_hub(tmp_path: Path) -> None:
    # The shipped BLIP-2 OPT-2.7B config: its model comes from the hub, offline here, so building it first would end
    # with the hub's error instead.
    missing = tmp_path / "no" / "vqav2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    args = ["validate", "-c", str(ROOT / "configs/experiments/blip2_opt27b_vqav2.yaml")]
    args += [f"--data.init_args.data_dir={missing}", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    args += ["--trainer.accelerator=cpu"]  # the config asks for a GPU, which is checked first (test_run_checks.py)
    run = subprocess.run(
        [sys.executable, "-m", "ecoflap_pl.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr[run.stderr.index("error (") :]
    assert error.startswith("error (configuration error): VQA questions of split 'val2014' not found")
    assert str(missing / "v2_OpenEnded_mscoco_val2014_questions.json") in error
    assert f"`data_dir` {missing} does not exist. HINT: set data_dir to the folder that holds the dataset" in error
    assert "or set `val_questions_file`" in error and len(error.splitlines()) <= 3
    assert "offline" not in run.stdout + run.stderr and "blip2-opt-2.7b" not in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf_home").exists()  # nothing written


@pytest.mark.parametrize(
    ("subcommand", "removed", "option"),
    [
        ("validate", "v2_OpenEnded_mscoco_val2014_questions.json", "val_questions_file"),
        ("validate", "v2_mscoco_train2014_annotations.json", "train_annotations_file"),  # calibration
        ("test", "v2_mscoco_val2014_annotations.json", "test_annotations_file"),
        ("test", "v2_OpenEnded_mscoco_train2014_questions.json", "train_questions_file"),
        ("fit", "v2_mscoco_train2014_annotations.json", "train_annotations_file"),
        ("fit", "v2_OpenEnded_mscoco_val2014_questions.json", "val_questions_file"),  # the sanity check's
        ("prune", "v2_OpenEnded_mscoco_train2014_questions.json", "train_questions_file"),
        ("predict", "v2_OpenEnded_mscoco_val2014_questions.json", "test_questions_file"),
    ],
)
def test_a_missing_file_of_the_run_is_named_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path, subcommand: str, removed: str, option: str
) -> None:
    (vqa_root / removed).unlink()
    stages = ["fit", "validate", "test", "predict"]
    outcome = run_ecoflap(capsys, subcommand, "-c", config(tmp_path, vqa_root, stages=stages))
    refused(outcome, str(vqa_root / removed), f"HINT: set `{option}`")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("subcommand", "folder"),
    [("validate", "val2014"), ("validate", "train2014"), ("test", "val2014"), ("fit", "val2014")],
)
def test_a_missing_image_folder_is_named_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path, subcommand: str, folder: str
) -> None:
    shutil.rmtree(vqa_root / folder)
    outcome = run_ecoflap(capsys, subcommand, "-c", config(tmp_path, vqa_root, stages=["validate", "test"]))
    error = refused(outcome, f"Image folder {vqa_root / folder} (set by `image_root`) does not exist.")
    assert f"HINT: images are read from `image_root`/{folder}" in error
    assert not (tmp_path / "run").exists()


def test_a_missing_image_file_is_named_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Any
) -> None:
    # The splits are read before the model is built, and reading a split checks that its image files exist (the flat
    # ImageNet val layout, whose images the CSV names).
    data_dir = tmp_path / "imagenet"
    shutil.copytree(demo_data.imagenet_flat, data_dir, ignore=shutil.ignore_patterns("train"))
    missing = data_dir / "val" / "ILSVRC2012_val_00000002.JPEG"
    missing.unlink()
    total = len(list((data_dir / "val").iterdir())) + 1
    init_args = {"data_dir": str(data_dir), "train_dir": str(demo_data.imagenet / "train")}
    data = {"class_path": "ecoflap_pl.datamodules.ImageNetDataModule", "init_args": init_args}
    outcome = run_ecoflap(capsys, "validate", "-c", config(tmp_path, data_dir, data))
    assert outcome.code == 2 and BUILT not in outcome.text, outcome.text[-3000:]
    error = outcome.text[outcome.text.index("error (configuration error): ") :].splitlines()
    assert error[0].endswith(
        f"Missing images: 1 of the {total} that the annotations name (image folder set by `val_dir`), e.g.:"
    )
    assert error[1].startswith(f"{missing} (for ImageId ILSVRC2012_val_00000002 (")
    assert error[2] == f"HINT: images are read from `val_dir` ({data_dir / 'val'})."
    assert not (tmp_path / "run").exists()


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _a_list(path: Path) -> None:
    path.write_text(json.dumps([json.loads(path.read_text(encoding="utf-8"))]), encoding="utf-8")


def _a_syntax_error(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8").replace('"', "'", 3), encoding="utf-8")


@pytest.mark.parametrize(
    ("subcommand", "damaged", "damage", "option", "problem"),
    [
        ("validate", "v2_OpenEnded_mscoco_val2014_questions.json", _cut_short, "val_questions_file", "it is cut short"),
        (  # the calibration split
            "validate",
            "v2_mscoco_train2014_annotations.json",
            _a_list,
            "train_annotations_file",
            "the top level must be a JSON object, got a JSON array. HINT: check that `train_annotations_file` names",
        ),
        ("test", "v2_mscoco_val2014_annotations.json", _a_syntax_error, "test_annotations_file", "at line 1, column"),
        ("fit", "v2_OpenEnded_mscoco_val2014_questions.json", _cut_short, "val_questions_file", "cut short"),
        ("prune", "v2_mscoco_train2014_annotations.json", _a_syntax_error, "train_annotations_file", "column"),
    ],
)
def test_a_damaged_annotation_file_is_named_before_the_model_is_built(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    vqa_root: Path,
    subcommand: str,
    damaged: str,
    damage: Callable[[Path], None],
    option: str,
    problem: str,
) -> None:
    # Before, the check looked up names only: a damaged file was found by `setup`, after the model was built.
    damage(vqa_root / damaged)
    outcome = run_ecoflap(capsys, subcommand, "-c", config(tmp_path, vqa_root, stages=["fit", "validate", "test"]))
    error = refused(outcome, str(vqa_root / damaged), f"`{option}`", problem)
    if damage is not _a_list:
        assert "is not valid JSON" in error and "HINT: the file is probably damaged or incomplete" in error
    assert not (tmp_path / "run").exists()


class DeletesFileTask(ClassificationTask):
    """A tiny timm classifier that deletes a file when it is built: a run that reads the file after building its
    model fails."""

    def __init__(self, delete: str, timm_model: str, model_config: dict[str, Any]) -> None:
        Path(delete).unlink()
        super().__init__(timm_model, pretrained=False, model_config=model_config)


def test_each_split_is_read_once_before_the_model_and_reused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Any
) -> None:
    # The DataModule the check reads with is not the one the parser builds after the model: the second takes over
    # the splits the first read, so no annotation file is parsed twice. The task deletes the validation labels (the
    # CSV of the flat ImageNet layout) when it is built: the run still prunes and evaluates.
    data_dir = tmp_path / "imagenet"
    shutil.copytree(demo_data.imagenet_flat, data_dir, ignore=shutil.ignore_patterns("train"))
    labels = data_dir / "LOC_val_solution.csv"
    model = {"timm_model": "vit_tiny_patch16_224", "model_config": TINY_VIT, "delete": str(labels)}
    path = vit_config(tmp_path, demo_data, report_dir=str(tmp_path / "report"))
    options = [f"--data.init_args.data_dir={data_dir}", f"--data.init_args.train_dir={demo_data.imagenet / 'train'}"]
    options += [f"--model={json.dumps({'class_path': f'{__name__}.DeletesFileTask', 'init_args': model})}"]
    outcome = run_ecoflap(capsys, "validate", "-c", path, *options)
    assert outcome.code == 0, outcome.text[-3000:]
    assert not labels.exists() and (tmp_path / "report" / "pruning_report.json").is_file()
    assert outcome.metric("val/loss") > 0  # evaluated


def test_the_training_split_is_not_needed_when_the_run_does_not_prune(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path
) -> None:
    (vqa_root / "v2_mscoco_train2014_annotations.json").unlink()
    went_on_to_the_model(run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root, stages=[])))
    went_on_to_the_model(run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root, stages=["test"])))
    refused(run_ecoflap(capsys, "test", "-c", config(tmp_path, vqa_root, stages=["test"])), "`train_annotations_file`")


def test_fit_without_validation_needs_no_validation_split(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path
) -> None:
    (vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    path = config(tmp_path, vqa_root)
    went_on_to_the_model(run_ecoflap(capsys, "fit", "-c", path, "--trainer.limit_val_batches=0"))
    refused(run_ecoflap(capsys, "fit", "-c", path), "`val_questions_file`")


@pytest.mark.parametrize("pruned", [True, False])
def test_a_pruned_checkpoint_needs_no_calibration_split(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path, pruned: bool
) -> None:
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"callbacks": {"ECoFLaPPruning": {"version": 1, "pruned": pruned}}}, checkpoint)
    (vqa_root / "v2_mscoco_train2014_annotations.json").unlink()
    outcome = run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root), f"--ckpt_path={checkpoint}")
    if pruned:  # evaluated as it is: not pruned again, so no calibration batch is read
        went_on_to_the_model(outcome)
    else:
        refused(outcome, "HINT: set `train_annotations_file`")


def test_a_bad_datamodule_argument_is_refused_before_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path
) -> None:
    outcome = run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root), "--data.init_args.val_split=val2015")
    refused(outcome, "`val_split` must be one of")


def test_a_datamodule_with_class_arguments_is_left_to_its_loop(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path
) -> None:
    # Only the parser instantiates class arguments, so such a DataModule is not built before the model: no false
    # refusal, no crash on the argument left as a dict; its files are looked up when its loop starts, as before.
    tag = {"class_path": f"{__name__}.Tag", "init_args": {"name": "x"}}
    data = {"class_path": f"{__name__}.TaggedVQAv2DataModule", "init_args": {"data_dir": str(vqa_root), "tag": tag}}
    went_on_to_the_model(run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root, data)))


def test_the_demo_on_an_empty_cache_builds_its_data_then_checks_it_before_training_a_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A demo DataModule writes its files when it is built, on first use: the check sees them, and a wrong override is
    # refused before the demo BLIP-2 is trained (minutes at the default preset).
    monkeypatch.setenv("ECOFLAP_DEMO_DIR", str(tmp_path / "cache"))
    args = ["validate", "-c", str(ROOT / "configs/demo/blip2_vqa.yaml"), "--data.init_args.preset=tiny"]
    args += ["--model.init_args.preset=tiny", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    outcome = run_ecoflap(capsys, *args, "--data.init_args.val_questions_file=missing.json")
    refused(outcome, str(tmp_path / "cache" / "data" / "tiny" / "coco" / "missing.json"), "`val_questions_file`")
    assert (tmp_path / "cache" / "data" / "tiny" / "coco" / "v2_OpenEnded_mscoco_val2014_questions.json").is_file()
    assert not (tmp_path / "cache" / "models").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("masks", "reuse"), [(True, True), (False, True), (True, False)])
def test_a_saved_pruned_model_needs_no_calibration_split(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vqa_root: Path, masks: bool, reuse: bool
) -> None:
    model = tiny_model("llama")
    folder = tmp_path / "pruned"
    folder.mkdir()
    if masks:  # a folder `save_to` wrote: weights and masks
        write_pruned_model(model, folder, {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 32, dtype=torch.bool)})
    else:  # a plain save_pretrained folder
        model.save_pretrained(folder)
    (vqa_root / "v2_mscoco_train2014_annotations.json").unlink()
    options = [f"--model.init_args.pretrained={folder}", f"--pruning.reuse_saved_masks={str(reuse).lower()}"]
    outcome = run_ecoflap(capsys, "validate", "-c", config(tmp_path, vqa_root), *options)
    if masks and reuse:  # evaluated as it is: not pruned again, so no calibration batch is read
        went_on_to_the_model(outcome)
    else:
        refused(outcome, "HINT: set `train_annotations_file`")


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_a_saved_timm_model_is_validated_as_saved_without_a_training_split(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Any, save_format: str
) -> None:
    folder = tmp_path / "pruned"
    path = vit_config(tmp_path, demo_data, save_to=str(folder), save_format=save_format)
    assert run_ecoflap(capsys, "prune", "-c", path).code == 0
    data_dir = tmp_path / "imagenet"
    shutil.copytree(demo_data.imagenet, data_dir, ignore=shutil.ignore_patterns("train"))
    saved = {"pretrained_cfg_overlay": {"file": str(folder / "model.safetensors")}}
    path = vit_config(tmp_path, demo_data, model=saved)  # the default stages: fit, validate, test
    options = [f"--data.init_args.data_dir={data_dir}", "--model.init_args.pretrained=true"]
    outcome = run_ecoflap(capsys, "validate", "-c", path, *options)
    assert outcome.code == 0, outcome.text[-3000:]
    assert f"masks from the saved model {folder}): `validate` uses it as it is, it is not pruned again" in outcome.text
    assert outcome.metric("val/loss") > 0

    refused = run_ecoflap(capsys, "validate", "-c", path, *options, "--compare_dense=true")
    assert refused.code != 0, refused.text[-3000:]
    assert f"already pruned: `pretrained` {folder} is a model saved with its masks." in refused.text
    assert "HINT: point `pretrained` at the dense model it was pruned from" in refused.text
