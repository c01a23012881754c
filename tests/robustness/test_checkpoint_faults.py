"""Resuming from a pruned checkpoint, and checkpoints damaged after they were written (see ``CASES.md``): the masks come
back bit for bit; a cut or changed file is refused in one message before the model is built."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from tests.robustness import test_cli_faults
from tests.robustness.cli_runs import run_ecoflap, vit_config
from tests.robustness.test_cli_faults import short_error

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


def test_a_checkpoint_with_a_changed_byte_is_refused_before_it_is_loaded(capsys, tmp_path, demo_data, pruned_run):
    """torch.load does not check the archive's checksums: a changed byte inside a weight loaded as a wrong value."""
    checkpoint, _ = pruned_run
    with zipfile.ZipFile(checkpoint) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(checkpoint.read_bytes())
    header = 30 + int.from_bytes(data[largest.header_offset + 26 : largest.header_offset + 28], "little")
    header += int.from_bytes(data[largest.header_offset + 28 : largest.header_offset + 30], "little")
    data[largest.header_offset + header + largest.file_size // 2] ^= 0x01  # one bit of one stored weight
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))

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
