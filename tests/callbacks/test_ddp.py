"""Two CPU processes (gloo): every rank ends with the same masks, equal to a single-process run on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ecoflap_pl.callbacks import ECoFLaPPruning
from tests.callbacks.callback_toys import FAST, MaskRecorder, ToyData, ToyTask
from tests.trainers import quiet_trainer


def fit(tmp_path: Path, devices: int) -> None:
    trainer = quiet_trainer(
        callbacks=[ECoFLaPPruning(**FAST), MaskRecorder(str(tmp_path))],
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(ToyTask(), datamodule=ToyData())


@pytest.mark.distributed
def test_ddp_ranks_build_identical_masks_equal_to_one_process(tmp_path: Path) -> None:
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    fit(tmp_path / "ddp", devices=2)
    fit(tmp_path / "single", devices=1)

    rank0 = torch.load(tmp_path / "ddp" / "masks_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "masks_rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "masks_rank0.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == single.keys() and rank0
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], single[name]), name

    weights = [torch.load(tmp_path / "ddp" / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, mask in rank0.items():
        assert torch.equal(weights[0][name], weights[1][name]), name  # DDP kept the ranks in step
        assert torch.count_nonzero(weights[0][name][~mask]) == 0, name  # and fine-tuning kept the zeros
