"""Every file and folder an export writes gets the modes of the umask, as ``save_pretrained`` into a plain folder with
a plain ``open()`` gives, though ``safetensors`` creates its files with mode 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ecoflap_pl.callbacks import export as callback_export
from ecoflap_pl.demo.cache import cached_build
from ecoflap_pl.export import write_pruned_model
from ecoflap_pl.models.tiny import tiny_model, tiny_timm
from ecoflap_pl.pruning import PruningConfig, PruningResult, prune

Batch = dict[str, torch.Tensor]


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``root`` and everything under it."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


def expected(root: Path, umask: int) -> dict[str, int]:
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~umask for name in modes(root)}


def pruned(model: nn.Module, batch: Batch, loss: Callable[[nn.Module, Batch], torch.Tensor]) -> PruningResult:
    return prune(model, [batch], loss, PruningConfig(sparsity=0.5, coarse_samples=2, fine_samples=2))


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_a_saved_hugging_face_model_follows_the_umask(tmp_path: Path, umask: int, save_format: str) -> None:
    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(8, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    result = pruned(model, batch, lambda m, b: m(**b, labels=b["input_ids"]).loss)
    target = tmp_path / "runs" / "pruned"
    callback_export.save_pruned(
        model, target, masks=result.masks, save_format=save_format, processors=[], result=result, metadata={}
    )
    found = modes(target)
    assert "model.safetensors" in found and "pruning_report.json" in found and "pruning_sparsity.png" in found
    assert found == expected(target, umask)
    assert sorted(path.name for path in target.parent.iterdir()) == ["pruned"]  # no lock file or probe left


def test_a_saved_timm_model_follows_the_umask(tmp_path: Path, umask: int) -> None:
    model = tiny_timm("vit")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = pruned(model, {"x": images}, lambda m, b: m(b["x"]).square().mean())
    target = tmp_path / "pruned"
    callback_export.save_pruned(
        model, target, masks=result.masks, save_format="dense", processors=[], result=result, metadata={}
    )
    assert {"model.safetensors", "masks", "masks/pruning_masks.safetensors"} <= set(modes(target))
    assert modes(target) == expected(target, umask)


def test_writing_into_an_existing_folder_keeps_the_modes_of_the_files_it_replaces(tmp_path: Path) -> None:
    model = tiny_model("llama")
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if "mlp" in name}
    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    (tmp_path / "model.safetensors").chmod(0o640)
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "notes.txt").chmod(0o600)
    previous = os.umask(0o022)
    try:
        write_pruned_model(model, tmp_path, masks)
    finally:
        os.umask(previous)
    found = modes(tmp_path)
    assert found["model.safetensors"] == 0o640 and found["notes.txt"] == 0o600  # replaced / left alone
    assert found["config.json"] == found["masks/pruning_masks.safetensors"] == 0o644 and found["masks"] == 0o755


def test_the_demo_cache_follows_the_umask(tmp_path: Path, umask: int) -> None:
    def build(folder: Path) -> None:
        (folder / "weights").mkdir()
        save_file({"w": torch.zeros(2)}, str(folder / "weights" / "model.safetensors"))

    target = cached_build(tmp_path / "models" / "vit-test", {"steps": 1}, build)
    assert modes(target) == expected(target, umask)
