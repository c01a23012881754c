"""A toy two-tower task and DataModule for the callback tests (importable by spawned DDP workers)."""

from __future__ import annotations

import zipfile
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from typing_extensions import override

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.tasks.base import EcoflapTask
from tests.pruning.pruning_helpers import ToyBlock

WIDTH, PATCHES, PATCH_DIM, TOKENS, VOCAB, CLASSES = 32, 4, 12, 6, 50, 4


class ToyVLM(nn.Module):
    """A vision tower and a language tower (two stacks of `ToyBlock`), fused by adding the pooled image feature."""

    def __init__(self, width: int = WIDTH, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Linear(PATCH_DIM, width)
        self.vision = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.embed = nn.Embedding(VOCAB, width)
        self.text = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image = self.patch(pixels)
        for block in self.vision:
            image = block(image)
        text = self.embed(tokens) + image.mean(dim=1, keepdim=True)
        for block in self.text:
            text = block(text)
        return self.head(text.mean(dim=1))


class ToyTask(EcoflapTask):
    """Classification with the toy VLM; records the sparsity its sanity-check validation saw."""

    def __init__(self, seed: int = 0, learning_rate: float = 1e-2, weight_decay: float = 0.05) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay)
        torch.manual_seed(seed)
        self.model = ToyVLM()
        self.sanity_zero_fraction: float | None = None

    @override
    def calibration_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(self.model(batch["pixels"], batch["tokens"]), batch["labels"])

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            self.sanity_zero_fraction = zero_fraction(self.model)
        self.log("val/loss", self.calibration_loss(batch), batch_size=batch["labels"].shape[0])

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test/loss", self.calibration_loss(batch), batch_size=batch["labels"].shape[0])

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model(batch["pixels"], batch["tokens"]).argmax(-1)


def zero_fraction(model: nn.Module) -> float:
    """Fraction of zeros over the Linear weights inside the two towers."""
    weights = [p for n, p in model.named_parameters() if n.startswith(("vision.", "text.")) and p.ndim == 2]
    return float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights))


def toy_samples(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixels": torch.randn(PATCHES, PATCH_DIM, generator=generator),
            "tokens": torch.randint(0, VOCAB, (TOKENS,), generator=generator),
            "labels": torch.randint(0, CLASSES, (), generator=generator),
        }
        for _ in range(count)
    ]


class ToyData(pl.LightningDataModule):
    """Deterministic samples; the calibration subset is the first ``num_samples`` training samples."""

    def __init__(self, samples: int = 16, batch_size: int = 4, calibration_batch_size: int = 4) -> None:
        super().__init__()
        self.samples = toy_samples(samples)
        self.batch_size = batch_size
        self.calibration_batch_size = calibration_batch_size

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.samples[:8], batch_size=self.batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def calibration_dataloader(self, num_samples: int | None = None) -> DataLoader:
        return DataLoader(self.samples[: num_samples or len(self.samples)], batch_size=self.calibration_batch_size)


class NoCalibrationData(ToyData):
    calibration_dataloader = None  # type: ignore[assignment]


FAST = {"coarse_samples": 8, "fine_samples": 16, "sparsity": 0.5, "progress": False}


class MaskRecorder(Callback):
    """Saves, per rank, the pruning callback's masks after pruning and the pruned weights after fit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _pruning(self, trainer: pl.Trainer) -> ECoFLaPPruning:
        return next(c for c in trainer.callbacks if isinstance(c, ECoFLaPPruning))  # type: ignore[attr-defined]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = {n: m.cpu() for n, m in self._pruning(trainer).masks.items()}
        torch.save(masks, f"{self.directory}/masks_rank{trainer.global_rank}.pt")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {n: p.detach().cpu() for n, p in pl_module.model.named_parameters()}  # type: ignore[union-attr]
        torch.save(weights, f"{self.directory}/weights_rank{trainer.global_rank}.pt")


class ZipEntryReads(Callback):
    """Saves, per rank, how many zip entries were read between ``setup`` and ``on_fit_start``: the checkpoint's
    load, whose check reads every entry of the archive once."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.reads = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        read_entry = zipfile.ZipFile.open

        def counted(archive: zipfile.ZipFile, name: Any, *args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return read_entry(archive, name, *args, **kwargs)

        self._read_entry = read_entry
        zipfile.ZipFile.open = counted  # type: ignore[method-assign]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        zipfile.ZipFile.open = self._read_entry  # type: ignore[method-assign]
        torch.save(self.reads, f"{self.directory}/reads_rank{trainer.global_rank}.pt")
