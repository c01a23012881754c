"""A fine-step method added from outside the package: one function and one ``register_method`` line, nothing else.

The method is a seeded random-mask pruner (a sanity baseline: any real method should beat it). It is registered here,
in the test, and then prunes through ``prune()``, the Lightning callback and the ``ecoflap`` entry point.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.cli import main
from ecoflap_pl.pruning.masks import apply_mask_, pruned_count, select_mask
from ecoflap_pl.pruning.methods import registry
from ecoflap_pl.pruning.methods.registry import register_method
from tests.callbacks.callback_toys import FAST, ToyData, ToyTask, zero_fraction
from tests.pruning.pruning_helpers import toy_batches, toy_loss
from tests.trainers import quiet_trainer


def random_mask_prune_(weight, statistics, sparsity, config):  # type: ignore[no-untyped-def]
    """Zero a seeded uniformly random ``round(numel · sparsity)`` subset of ``weight``; return the mask."""
    generator = torch.Generator(device=weight.device).manual_seed(config.seed)
    scores = torch.rand(weight.shape, generator=generator, device=weight.device)
    mask = select_mask(scores, sparsity, config.comparison, config.n_m)
    apply_mask_(weight, mask)
    return mask


@pytest.fixture
def random_mask(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``random_mask`` registered for one test (on a copy of the registry, so other tests see the built-ins only)."""
    monkeypatch.setattr(registry, "_METHODS", registry._METHODS.copy())
    register_method("random_mask", inputs="none")(random_mask_prune_)
    yield "random_mask"


def _expected_mask(weight: torch.Tensor, sparsity: float, seed: int) -> torch.Tensor:
    scores = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed))
    keep = weight.numel() - pruned_count(weight.numel(), sparsity)
    expected = torch.zeros(weight.numel(), dtype=torch.bool)
    expected[scores.flatten().topk(keep).indices] = True
    return expected.view_as(weight)


def test_registered_method_prunes_through_prune(random_mask, toy_model):
    dense = {name: param.detach().clone() for name, param in toy_model.named_parameters()}
    config = PruningConfig(sparsity=0.5, importance="uniform", method=random_mask, fine_samples=8, seed=3)
    assert config.comparison == "per_matrix"  # the method's declared default
    result = prune(toy_model, toy_batches(2), toy_loss, config)
    assert result.config.method == "random_mask" and result.masks
    # inputs="none": the fine step ran no forward at all to measure statistics.
    assert result.stages["fine"].full_forwards == 0 and result.stages["fine"].block_forwards == 0
    params = dict(toy_model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.equal(mask, _expected_mask(dense[name], 0.5, seed=3)), name
        assert torch.equal(params[name].detach(), dense[name] * mask), name


def test_unknown_method_lists_the_registered_ones(random_mask):
    known = r"\['wanda', 'sparsegpt', 'magnitude', 'random_mask'\]"
    with pytest.raises(ValueError, match=rf"`method` must be one of {known}, got 'random'"):
        PruningConfig(method="random")


def test_registered_method_prunes_through_the_callback(random_mask, tmp_path: Path):
    callback = ECoFLaPPruning(**{**FAST, "importance": "uniform", "method": random_mask}, stages="validate")
    task = ToyTask()
    dense = {name: param.detach().clone() for name, param in task.model.named_parameters()}
    quiet_trainer(callbacks=[callback], default_root_dir=tmp_path, limit_val_batches=1).validate(
        task, datamodule=ToyData()
    )
    assert callback.result is not None and callback.result.config.method == "random_mask"
    assert zero_fraction(task.model) == pytest.approx(0.5, abs=0.01)
    # The masks are the registered method's: seeded random subsets, exact counts, no statistics measured.
    assert callback.masks and callback.result.stages["fine"].full_forwards == 0
    for name, mask in callback.masks.items():
        assert torch.equal(mask, _expected_mask(dense[name], 0.5, seed=callback.config.seed)), name


def test_registered_method_prunes_through_the_cli(
    random_mask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blip2_dir, demo_data
):
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {
            "class_path": "ecoflap_pl.tasks.CaptioningTask",
            "init_args": {"pretrained": str(blip2_dir), "num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 0},
        },
        "data": {
            "class_path": "ecoflap_pl.datamodules.COCOCaptionDataModule",
            "init_args": {"data_dir": str(demo_data.coco), "batch_size": 2, "calibration_batch_size": 2},
        },
        "pruning": {"sparsity": 0.5, "importance": "uniform", "method": random_mask, "fine_samples": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["ecoflap"])  # the entry point, in this process, with only these arguments
    main(["prune", "-c", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1"])
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["config"]["method"] == "random_mask"
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["stages"]["fine"]["full_forwards"] == 0  # inputs="none": a method that measures nothing ran
