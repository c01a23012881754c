"""An allocation strategy registered from outside the package runs through the ``ecoflap`` command by its name.

docs/allocation.md and docs/extending.md say so: the command takes any registered name (the ``pruning.allocation``
option is the ``AllocationName`` literal or any string, checked by ``PruningConfig`` against the registry); adding the
name to the literal only makes ``--help`` list it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from ecoflap_pl.cli import main
from ecoflap_pl.pruning.allocation import Allocation, register_allocation, registry


def test_the_cli_takes_a_registered_strategy_that_its_literal_does_not_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, blip2_dir, demo_data
):
    monkeypatch.setattr(registry, "_STRATEGIES", registry._STRATEGIES.copy())  # the built-ins only for other tests

    @register_allocation("deeper_is_sparser")
    def deeper_is_sparser(request):
        groups = list(request.groups)
        steps = max(len(groups) - 1, 1)
        return Allocation({g: 0.4 + 0.2 * i / steps for i, g in enumerate(groups)})

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
        "pruning": {"sparsity": 0.5, "allocation": "deeper_is_sparser", "method": "magnitude", "fine_samples": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["ecoflap"])  # the entry point, in this process, with only these arguments
    main(["prune", "-c", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1"])
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["config"]["allocation"] == "deeper_is_sparser"
    assert "coarse" not in report["stages"]  # a strategy that reads no scores runs no coarse step
    # Four blocks in forward order (two of the vision tower, two of the language model): 0.4 rising to 0.6.
    assert list(report["group_sparsity"].values()) == pytest.approx([0.4 + 0.2 * i / 3 for i in range(4)])
