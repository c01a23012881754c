"""The demo end to end, as a newcomer runs it: ``ecoflap`` on each ``configs/demo`` file, at the seconds-long
``tiny`` preset (same code, data in the official layouts, models trained through ``Trainer.fit``), then again on
the warm cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecoflap_pl.demo.blip2 import vision_tower_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
TINY = [
    "--model.init_args.preset=tiny",
    "--data.init_args.preset=tiny",
    "--data.init_args.batch_size=4",
    "--data.init_args.calibration_batch_size=2",
    "--pruning.coarse_samples=2",
    "--pruning.fine_samples=4",
    "--pruning.progress=false",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def ecoflap(subcommand: str, config: str, cache_dir: Path, run_dir: Path, *extra: str) -> str:
    """``ecoflap <subcommand> -c configs/demo/<config>`` in a fresh process with the demo cache in ``cache_dir``."""
    env = {**os.environ, "ECOFLAP_DEMO_DIR": str(cache_dir)}
    args = [sys.executable, "-m", "ecoflap_pl.cli", subcommand, "-c", str(CONFIGS / config), *TINY]
    args += [f"--trainer.default_root_dir={run_dir}", *extra]
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _builds(cache_dir: Path) -> dict[str, float]:
    """Modification time of every cached build's marker, by build directory."""
    return {
        str(marker.parent.relative_to(cache_dir)): marker.stat().st_mtime_ns
        for marker in cache_dir.rglob("*.json")
        if marker.name.startswith("ecoflap_demo")
    }


def test_blip2_vqa_demo_prunes_and_compares_then_reuses_the_cache(cache_dir: Path, tmp_path: Path) -> None:
    out = ecoflap("validate", "blip2_vqa.yaml", cache_dir, tmp_path / "first")
    assert "Dense vs pruned" in out and "val/accuracy" in out
    report = json.loads((tmp_path / "first" / "pruning_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.6, abs=0.05)
    assert report["config"]["importance"] == "zeroth_order" and report["config"]["method"] == "wanda"
    assert {name.rsplit(".", 1)[0] for name in report["group_scores"]} == {  # both towers are stacks to prune
        "vision_model.encoder.layers",
        "language_model.model.decoder.layers",
    }
    assert (tmp_path / "first" / "pruning_sparsity.png").is_file()
    built = _builds(cache_dir)
    assert {"data/tiny", "models/vit-tiny", "models/blip2-tiny"} <= set(built)
    blip2 = load_file(cache_dir / "models" / "blip2-tiny" / "model.safetensors")
    vit = vision_tower_weights(load_file(cache_dir / "models" / "vit-tiny" / "model.safetensors"))
    assert all(torch.equal(blip2[f"vision_model.{name}"], weight) for name, weight in vit.items())  # kept frozen

    again = ecoflap("validate", "blip2_vqa.yaml", cache_dir, tmp_path / "second")
    assert _builds(cache_dir) == built  # nothing rebuilt
    second = json.loads((tmp_path / "second" / "pruning_report.json").read_text())
    assert (
        second["group_scores"] == report["group_scores"] and second["achieved_sparsity"] == report["achieved_sparsity"]
    )
    assert "Dense vs pruned" in again


def test_blip2_caption_demo(cache_dir: Path, tmp_path: Path) -> None:
    out = ecoflap("validate", "blip2_caption.yaml", cache_dir, tmp_path)
    assert "Dense vs pruned" in out and "val/cider" in out
    assert (tmp_path / "pruning_report.json").is_file()


def test_vit_imagenet_demo(cache_dir: Path, tmp_path: Path) -> None:
    out = ecoflap("validate", "vit_imagenet.yaml", cache_dir, tmp_path)
    assert "Dense vs pruned" in out and "val/top1" in out
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.05)


def test_blip2_finetune_demo_keeps_the_masks(cache_dir: Path, tmp_path: Path) -> None:
    from transformers import Blip2ForConditionalGeneration

    ecoflap(
        "fit",
        "blip2_finetune.yaml",
        cache_dir,
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        f"--pruning.save_to={tmp_path / 'pruned'}",
    )
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.7, abs=0.05)
    pruned = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "pruned").state_dict()
    dense = Blip2ForConditionalGeneration.from_pretrained(cache_dir / "models" / "blip2-tiny").state_dict()
    for name, sparsity in report["achieved_sparsity"].items():
        zeros = pruned[name] == 0
        assert zeros.float().mean().item() == pytest.approx(sparsity, abs=1e-6), name  # masks held through training
    trained = [
        name
        for name in report["achieved_sparsity"]
        if not pruned[name].eq(dense[name]).logical_or(pruned[name] == 0).all()
    ]
    assert trained  # and the kept weights were fine-tuned


def test_a_first_run_prints_our_bars_tables_and_paths_and_nothing_else(tmp_path: Path) -> None:
    env = {**os.environ, "ECOFLAP_DEMO_DIR": str(tmp_path / "cache")}
    quiet = [arg for arg in TINY if arg not in ("--pruning.progress=false", "--trainer.enable_progress_bar=false")]
    args = [sys.executable, "-m", "ecoflap_pl.cli", "validate", "-c", str(CONFIGS / "blip2_vqa.yaml"), *quiet]
    run = subprocess.run(
        [*args, f"--trainer.default_root_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    for noise in (
        "GPU available",
        "TPU available",
        "Tip:",
        "litlogger",
        "deprecated",
        "Epoch ",
        "Seed set",
        "stopped:",
        "Loading weights",
        "Writing model shards",
        "generation flags",
    ):
        assert noise not in console, noise
    assert "Training the demo BLIP-2" in console and "Training the demo ViT" in console
    assert "Dense vs pruned" in console and "Validate metric" not in console  # one table for both runs
    assert f"Pruning report: {tmp_path / 'run' / 'pruning_report.json'}" in console.replace("\n", "")
