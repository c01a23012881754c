"""Round trips of the save formats on tiny pruned models: weights, outputs and masks come back exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ecoflap_pl.export import (
    SAVE_FORMATS,
    check_save_format,
    is_sparse_export,
    least_export_bytes,
    load_pruned_model,
    load_pruned_state_dict,
    read_masks,
    write_pruned_model,
)
from ecoflap_pl.models.loading import build_hf_model, load_pretrained
from ecoflap_pl.pruning import PruningConfig, prune
from ecoflap_pl.tasks import LanguageModelingTask
from tests.callbacks.test_save_to import TinyLlamaTask
from tests.pruning.pruning_helpers import family_case

CASES = [
    ("unstructured", "dense"),
    ("unstructured", "sparse-bitmask"),
    ("2:4", "dense"),
    ("2:4", "sparse-bitmask"),
    ("2:4", "sparse-24-bitmask"),
]


def pruned(family: str, structure: str):
    torch.set_num_threads(1)
    model, batches, loss_fn = family_case(family, batches=2, size=2)
    importance = "uniform" if structure == "2:4" else "zeroth_order"
    config = PruningConfig(sparsity=0.5, structure=structure, importance=importance, coarse_samples=2, fine_samples=4)
    result = prune(model, batches, loss_fn, config)
    return model, batches, loss_fn, dict(result.masks)


@pytest.mark.parametrize("family", ["llama", "blip2_opt"])
@pytest.mark.parametrize(("structure", "save_format"), CASES)
def test_hugging_face_round_trip(tmp_path: Path, family: str, structure: str, save_format: str) -> None:
    model, batches, loss_fn, masks = pruned(family, structure)
    saved = write_pruned_model(model, tmp_path, masks, save_format)

    loaded = load_pruned_model(tmp_path).eval()
    assert type(loaded) is type(model)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with torch.no_grad():
        assert torch.equal(loss_fn(loaded, batches[0]), loss_fn(model, batches[0]))
    recovered = read_masks(tmp_path)
    assert recovered.keys() == masks.keys()
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())
    assert saved.save_format == save_format
    assert saved.weights_bytes >= least_export_bytes(model, save_format, 0.5)  # the free-space check's bound holds
    if save_format == "dense":
        assert saved.weights_bytes >= saved.dense_bytes
    else:
        assert saved.weights_bytes < saved.dense_bytes
        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
            names = set(handle.keys())
        module = next(iter(masks)).removesuffix(".weight")
        assert f"{module}.bitmask" in names and f"{module}.weight" not in names


def test_kept_weights_that_are_zero_keep_their_mask(tmp_path: Path) -> None:
    model, _, _, masks = pruned("llama", "2:4")
    name = next(iter(masks))
    with torch.no_grad():
        model.get_parameter(name)[masks[name]] = 0.0  # kept, but zero: the mask, not the values, is stored
    write_pruned_model(model, tmp_path, masks, "sparse-24-bitmask")
    assert torch.equal(read_masks(tmp_path)[name], masks[name])


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_timm_round_trip_is_a_state_dict_and_masks(tmp_path: Path, save_format: str) -> None:
    structure = "2:4" if save_format == "sparse-24-bitmask" else "unstructured"
    model, batches, loss_fn, masks = pruned("vit", structure)
    write_pruned_model(model, tmp_path, masks, save_format)

    state_dict, recovered = load_pruned_state_dict(tmp_path)
    fresh = family_case("vit", seed=1)[0]
    fresh.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.equal(loss_fn(fresh, batches[0]), loss_fn(model, batches[0]))
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())


def test_the_24_format_refuses_masks_that_are_not_2_4(tmp_path: Path) -> None:
    model, _, _, masks = pruned("llama", "unstructured")
    with pytest.raises(ValueError, match="2 of every 4 .* HINT: prune with structure '2:4'"):
        write_pruned_model(model, tmp_path, masks, "sparse-24-bitmask")
    with pytest.raises(ValueError, match="`structure` is 'unstructured'.*HINT"):
        check_save_format("sparse-24-bitmask", "unstructured")
    with pytest.raises(ValueError, match="`save_format` must be one of .*got 'bitmask'"):
        check_save_format("bitmask", "unstructured")


@pytest.mark.parametrize(("family", "model_class"), [("llama", AutoModelForCausalLM), ("blip2_opt", None)])
def test_the_ecoflap_model_loaders_decode_a_sparse_export(tmp_path: Path, family: str, model_class: Any) -> None:
    model, batches, loss_fn, masks = pruned(family, "unstructured")
    write_pruned_model(model, tmp_path / "sparse", masks, "sparse-bitmask")
    write_pruned_model(model, tmp_path / "dense", masks, "dense")
    assert is_sparse_export(tmp_path / "sparse")
    assert not is_sparse_export(tmp_path / "dense") and not is_sparse_export("Salesforce/blip2-opt-2.7b")

    if model_class is None:  # the vision-language tasks' path
        loaded = build_hf_model(type(model), pretrained=str(tmp_path / "sparse")).eval()
    else:  # the language-modelling task's path, through an Auto class
        loaded = load_pretrained(model_class, str(tmp_path / "sparse")).eval()
    assert type(loaded) is type(model)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loss_fn(loaded, batches[0]), loss_fn(model, batches[0]))


def test_a_sparse_export_stores_tied_weights_under_the_names_save_pretrained_keeps(tmp_path: Path) -> None:
    model, _, _, masks = pruned("blip2_opt", "unstructured")
    assert model.config.text_config.tie_word_embeddings  # lm_head shares the input embedding
    write_pruned_model(model, tmp_path / "sparse", masks, "sparse-bitmask")
    write_pruned_model(model, tmp_path / "dense", masks, "dense")
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), framework="pt") as handle:
        dense_names = set(handle.keys())
    with safe_open(str(tmp_path / "sparse" / "model.safetensors"), framework="pt") as handle:
        sparse_names = {
            name for name in handle.keys() if not name.endswith(("compressed", "bitmask", "shape", "row_offsets"))
        }  # noqa: SIM118
    assert sparse_names == dense_names - set(masks)


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_top_level_safetensors_hold_only_the_model_weights(tmp_path: Path, save_format: str) -> None:
    """vLLM loads every top-level ``*.safetensors`` of a folder without a shard index as weights: a masks file there,
    its tensors named like the weights, would be loaded over them."""
    structure = "2:4" if save_format == "sparse-24-bitmask" else "unstructured"
    model, _, _, masks = pruned("llama", structure)
    write_pruned_model(model, tmp_path, masks, save_format)

    assert [path.name for path in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(tmp_path.glob("*.safetensors.index.json"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    if save_format == "dense":
        assert stored <= set(model.state_dict())


def test_masks_of_folders_written_before_the_masks_subfolder_are_read(tmp_path: Path) -> None:
    model, _, _, masks = pruned("llama", "unstructured")
    write_pruned_model(model, tmp_path, masks, "dense")
    (tmp_path / "masks" / "pruning_masks.safetensors").rename(tmp_path / "pruning_masks.safetensors")
    (tmp_path / "masks").rmdir()

    recovered = read_masks(tmp_path)
    assert recovered.keys() == masks.keys()
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())
    (tmp_path / "pruning_masks.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No masks/pruning_masks.safetensors in .*HINT"):
        read_masks(tmp_path)


@pytest.mark.parametrize("damaged", ["model.safetensors", "masks/pruning_masks.safetensors"])
def test_a_damaged_file_of_the_folder_is_named(tmp_path: Path, damaged: str) -> None:
    model, _, _, masks = pruned("llama", "unstructured")
    write_pruned_model(model, tmp_path, masks, "dense")
    (tmp_path / damaged).write_bytes((tmp_path / damaged).read_bytes()[:100])  # a copy cut short

    with pytest.raises(ValueError, match=rf"{damaged} cannot be read as a safetensors file .*HINT: .*export"):
        read_masks(tmp_path)
    with pytest.raises(ValueError, match=rf"{damaged} cannot be read as a safetensors file"):
        load_pruned_state_dict(tmp_path)


def test_load_pruned_model_of_a_folder_without_a_model_config_says_what_to_do(tmp_path: Path) -> None:
    """A timm save_to folder, a missing folder and an unknown architecture were a bare FileNotFoundError on
    config.json, or a KeyError / AttributeError."""
    model, _, _, masks = pruned("vit", "unstructured")
    (tmp_path / "vit").mkdir()
    write_pruned_model(model, tmp_path / "vit", masks, "dense")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: it holds no Hugging Face model\. HINT: .*"):
        load_pruned_model(tmp_path / "vit")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: it is not a save_to folder\. HINT"):
        load_pruned_model(tmp_path / "missing")
    llama, _, _, llama_masks = pruned("llama", "unstructured")
    (tmp_path / "llama").mkdir()
    write_pruned_model(llama, tmp_path / "llama", llama_masks, "dense")
    config = tmp_path / "llama" / "config.json"
    config.write_text(config.read_text().replace("LlamaForCausalLM", "LlamaForTimeTravel"))
    with pytest.raises(ValueError, match=r"architecture 'LlamaForTimeTravel'.*HINT: pass model_class="):
        load_pruned_model(tmp_path / "llama")
    assert type(load_pruned_model(tmp_path / "llama", AutoModelForCausalLM)) is type(llama)


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
@pytest.mark.parametrize("model_class", [LlamaForCausalLM, AutoModelForCausalLM])
def test_load_pruned_model_with_a_class_for_another_model_says_which_fits(
    tmp_path: Path, save_format: str, model_class: Any
) -> None:
    """A BLIP-2 folder loaded as a causal LM failed inside transformers: "'dict' object has no attribute 'to_dict'",
    "'Blip2Config' object has no attribute 'pad_token_id'", or a bare KeyError naming the config class."""
    model, _, _, masks = pruned("blip2_opt", "unstructured")
    write_pruned_model(model, tmp_path, masks, save_format)
    with pytest.raises(
        TypeError,
        match=rf"`model_class` {model_class.__name__} cannot load the model in .*: that is a "
        r"Blip2ForConditionalGeneration \(its config.json holds a Blip2Config\)\. HINT: leave model_class out",
    ):
        load_pruned_model(tmp_path, model_class)
    assert type(load_pruned_model(tmp_path, type(model))) is type(model)


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_a_task_loads_a_saved_folder_named_from_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_format: str
) -> None:
    """`pretrained: ~/models/pruned` in a config file, which no shell expands (before: "Repo id must use alphanumeric
    chars …": from_pretrained took it for a hub name)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = TinyLlamaTask()
    name = "model.layers.0.mlp.up_proj.weight"
    mask = torch.rand(saved.model.get_parameter(name).shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        saved.model.get_parameter(name)[~mask] = 0.0
    write_pruned_model(saved.model, tmp_path / "models" / "pruned", {name: mask}, save_format, [saved.tokenizer])

    task = LanguageModelingTask(pretrained="~/models/pruned")
    assert task.model.name_or_path == str(tmp_path / "models" / "pruned")
    expected = saved.model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in task.model.state_dict().items())
    assert task.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    # `tokenizer` too (before: the same hub-name error)
    with_tokenizer = LanguageModelingTask(pretrained="~/models/pruned", tokenizer="~/models/pruned")
    assert with_tokenizer.tokenizer.get_vocab() == saved.tokenizer.get_vocab()


@pytest.mark.parametrize(
    ("structure", "save_format"), [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")]
)
def test_the_masks_of_a_sparse_export_are_read_from_its_bitmasks_alone(
    tmp_path: Path, structure: str, save_format: str
) -> None:
    """`read_masks` (what a run from a saved folder calls, after loading the model) reads the bitmasks and shapes
    only: here the kept values are left out of the file. Before, it decoded the whole state dict, a dense copy of every
    weight (113 M parameters: 1.1 s and 810 MiB more peak memory, against 0.07 s and 133 MiB, the masks)."""
    model, _, _, masks = pruned("llama", structure)
    write_pruned_model(model, tmp_path, masks, save_format)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        kept = {name: handle.get_tensor(name) for name in handle.keys() if name.endswith((".bitmask", ".shape"))}  # noqa: SIM118
    save_file(kept, str(path), metadata=metadata)

    recovered = read_masks(tmp_path)
    assert recovered.keys() == masks.keys()
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())
