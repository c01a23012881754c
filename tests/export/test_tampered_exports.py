"""Exports changed after they were written, and exports stored in several shards (models over ``huggingface_hub``'s
5 GB per file, written here with a tiny shard size): read back in their format, or refused by name, never loaded
wrong (rows 115-117 of the robustness cases table)."""

from __future__ import annotations

import functools
from pathlib import Path

import huggingface_hub
import pytest
import torch

from ecoflap_pl.export import (
    is_sparse_export,
    load_pruned_model,
    load_pruned_state_dict,
    read_masks,
    write_pruned_model,
)
from ecoflap_pl.export.checkpoint import MASKS_FILE
from tests.export.test_formats import pruned


def write_sharded(
    monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, folder: Path, masks: dict, save_format: str
) -> None:
    """``write_pruned_model`` as for a model of many GB: every writer it calls splits the weights into shards."""
    folder.mkdir()
    shard = "20KB"
    monkeypatch.setattr(
        huggingface_hub,
        "save_torch_state_dict",
        functools.partial(huggingface_hub.save_torch_state_dict, max_shard_size=shard),
    )
    monkeypatch.setattr(model, "save_pretrained", functools.partial(model.save_pretrained, max_shard_size=shard))
    write_pruned_model(model, folder, masks, save_format)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1


def test_a_sharded_sparse_export_is_read_in_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse format was read from the first shard's metadata, which huggingface_hub leaves out of shards: the
    folder passed for dense, and load_pruned_model handed the compressed tensors to from_pretrained."""
    model, _, _, masks = pruned("llama", "unstructured")
    write_sharded(monkeypatch, model, tmp_path / "sparse", masks, "sparse-bitmask")

    assert is_sparse_export(tmp_path / "sparse")
    state_dict, recovered = load_pruned_state_dict(tmp_path / "sparse")
    assert recovered.keys() == masks.keys()
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())
    assert all(torch.equal(state_dict[name], value) for name, value in model.state_dict().items() if name in state_dict)
    loaded = load_pruned_model(tmp_path / "sparse")
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_a_missing_shard_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_format: str) -> None:
    model, _, _, masks = pruned("llama", "unstructured")
    folder = tmp_path / "pruned"
    write_sharded(monkeypatch, model, folder, masks, save_format)
    gone = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()

    expected = rf"{folder} is incomplete: its model.safetensors.index.json lists .*\({gone.name}\)\. HINT: .*copy"
    for read in (load_pruned_model, load_pruned_state_dict, read_masks):
        with pytest.raises(FileNotFoundError, match=expected):
            read(folder)


def test_masks_of_another_model_are_refused(tmp_path: Path) -> None:
    """A masks file copied from another export was read as it was, beside weights it does not describe."""
    model, _, _, masks = pruned("llama", "unstructured")
    write_pruned_model(model, tmp_path / "pruned", masks, "dense")
    other, _, _, other_masks = pruned("blip2_opt", "unstructured")
    write_pruned_model(other, tmp_path / "other", other_masks, "dense")
    (tmp_path / "pruned" / MASKS_FILE).write_bytes((tmp_path / "other" / MASKS_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"does not belong to the model in .*pruned: none of its masks names a stored"):
        read_masks(tmp_path / "pruned")

    name = next(iter(masks))
    write_pruned_model(model, tmp_path / "resized", {**masks, name: masks[name][:, :-1]}, "dense")
    with pytest.raises(ValueError, match=rf"{name!r} is \[.*\] there but \[.*\] in the weights\. HINT"):
        read_masks(tmp_path / "resized")
    assert read_masks(tmp_path / "other").keys() == other_masks.keys()


def test_the_masks_of_a_model_saved_under_its_hub_names_are_read(tmp_path: Path) -> None:
    """transformers saves a LLaVA under its hub checkpoint's names (``language_model.model.layers...``), not its
    modules' (``model.language_model.layers...``), which the masks use: every dense LLaVA export was refused as if its
    masks file came from another model."""
    from ecoflap_pl.models.tiny import tiny_model

    model = tiny_model("llava")
    name = next(name for name, _ in model.named_parameters() if name.endswith("mlp.down_proj.weight"))
    weight = model.get_parameter(name)
    mask = torch.arange(weight.numel()).reshape(weight.shape) % 2 == 0
    with torch.no_grad():
        weight[~mask] = 0.0
    write_pruned_model(model, tmp_path / "pruned", {name: mask}, "dense")

    recovered = read_masks(tmp_path / "pruned")
    assert recovered.keys() == {name} and torch.equal(recovered[name], mask)
    resized = {name: mask[:, :-1]}
    write_pruned_model(model, tmp_path / "resized", resized, "dense")
    with pytest.raises(ValueError, match=rf"{name!r} is \[.*\] there but \[.*\] in the weights\. HINT"):
        read_masks(tmp_path / "resized")
