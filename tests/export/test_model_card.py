"""The model card (``README.md``) of a ``save_to`` folder: Hub metadata, the report's figures, the folder's files and
loading code that loads the model."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from ecoflap_pl.callbacks import export as callback_export
from ecoflap_pl.export import MODEL_CARD, SavedModel, model_card
from ecoflap_pl.models.tiny import tiny_model, tiny_timm
from ecoflap_pl.pruning import PruningConfig, PruningResult, prune

METADATA = {"ecoflap_pl_version": "9.8.7", "created": "2026-01-02T03:04:05+00:00", "stage": "validate"}
FOLDER = "path/to/this/folder"


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, PruningResult]:
    torch.set_num_threads(1)
    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(8, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    config = PruningConfig(sparsity=0.5, coarse_samples=2, fine_samples=2)
    return model, prune(model, [batch], lambda m, b: m(**b, labels=b["input_ids"]).loss, config)


def export(model: nn.Module, result: PruningResult, target: Path, save_format: str) -> tuple[ModelCard, dict]:
    """Write ``model`` into ``target`` as ``save_to`` does; its card (as the Hub parses it) and report."""
    callback_export.save_pruned(
        model, target, masks=result.masks, save_format=save_format, processors=[], result=result, metadata=METADATA
    )
    return ModelCard.load(target / MODEL_CARD), json.loads((target / "pruning_report.json").read_text())


def loading_code(card: ModelCard, folder: Path) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    assert FOLDER in code
    return code.replace(FOLDER, str(folder))


def assert_figures_of_the_report(card: ModelCard, report: dict[str, Any], folder: Path) -> None:
    """The card's sparsity, tower rows, sizes, version and date are the report's; it names every file of the
    folder."""
    candidates = sum(report["sizes"].values())
    assert f"{100 * report['overall_sparsity']:.2f}% of the model's {candidates:,} candidate weights" in card.text
    assert "| tower | candidate weights | achieved sparsity |" in card.text
    for tower, achieved in report["tower_sparsity"].items():
        weights = sum(row["params"] for row in report["blocks"] if row["tower"] == tower)
        assert f"| `{tower}` | {weights:,} | {100 * achieved:.2f}% |" in card.text
    config = report["config"]
    assert f"target sparsity {100 * config['sparsity']:.2f}%, max_sparsity {100 * config['max_sparsity']:.2f}%" in (
        card.text
    )
    read = {stage: report["stages"][stage]["samples"] for stage in ("coarse", "fine")}
    assert all(read.values())
    assert f"{read['coarse']} for the coarse scores" in card.text and f"{read['fine']} for the fine step" in card.text
    saved = report["metadata"]["export"]
    assert f"({saved['weights_bytes']:,} bytes) on disk" in card.text
    assert f"({saved['dense_bytes']:,} bytes) they take stored dense" in card.text
    assert f"ecoflap-pl {METADATA['ecoflap_pl_version']} on {METADATA['created']}" in card.text
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    assert MODEL_CARD in files
    assert all(f"`{name}`" in card.text for name in files if name != MODEL_CARD)


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_a_hugging_face_export_carries_a_card_with_the_figures_of_its_report(
    tmp_path: Path, llama: tuple[nn.Module, PruningResult], save_format: str
) -> None:
    model, result = llama
    card, report = export(model, result, tmp_path / "pruned", save_format)

    assert card.data.library_name == "transformers"
    assert card.data.base_model is None  # built from a config: it comes from no Hub repository
    sparse = save_format != "dense"
    assert card.data.tags == ["pruned", "sparse", "ecoflap", "wanda", *(["compressed-tensors"] if sparse else [])]
    assert card.text.lstrip().startswith("# LlamaForCausalLM pruned with ECoFLaP")
    assert "allocation `ecoflap` on `zeroth_order` scores, fine step `wanda`, structure `unstructured`" in card.text
    assert "as pruned, not trained after pruning" in card.text
    assert_figures_of_the_report(card, report, tmp_path / "pruned")
    assert ("masks/pruning_masks.safetensors" in card.text) is not sparse  # a sparse format's bitmasks are its masks

    namespace: dict[str, Any] = {}
    exec(loading_code(card, tmp_path / "pruned"), namespace)
    loaded, expected = namespace["model"], model.state_dict()
    assert type(loaded) is type(model)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    assert ("load_pruned_model" in loading_code(card, tmp_path)) is sparse


def test_a_timm_export_carries_a_card_that_loads_it(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_timm("vit")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = prune(model, [{"x": images}], lambda m, b: m(b["x"]).square().mean(), PruningConfig(sparsity=0.5))
    card, report = export(model, result, tmp_path / "pruned", "dense")

    assert card.data.library_name == "timm" and card.data.base_model is None
    assert card.text.lstrip().startswith("# VisionTransformer pruned with ECoFLaP")
    assert_figures_of_the_report(card, report, tmp_path / "pruned")
    build = 'model = timm.create_model("vit_base_patch16_224", pretrained=False)'
    code = loading_code(card, tmp_path / "pruned")
    assert build in code and "load_model(model, " in code
    namespace: dict[str, Any] = {"rebuild": lambda: tiny_timm("vit", seed=1)}  # the tiny arguments, other weights
    exec(code.replace(build, "model = rebuild()"), namespace)
    loaded = namespace["model"].state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in model.state_dict().items())


def test_the_base_model_is_the_hub_repository_the_model_was_loaded_from(
    tmp_path: Path, llama: tuple[nn.Module, PruningResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, result = llama
    saved = SavedModel("dense", 1, 1)
    monkeypatch.chdir(tmp_path)
    try:
        # As from_pretrained("someone/tiny-llama") records it.
        model.name_or_path = model.config.name_or_path = "someone/tiny-llama"
        assert model_card(model, result, saved).data.base_model == "someone/tiny-llama"
        (tmp_path / "someone" / "tiny-llama").mkdir(parents=True)  # now a local folder of that name: not the Hub's
        assert model_card(model, result, saved).data.base_model is None
        model.name_or_path = model.config.name_or_path = str(tmp_path / "elsewhere")
        assert model_card(model, result, saved).data.base_model is None
    finally:
        model.name_or_path = model.config.name_or_path = ""


def test_the_card_of_fine_tuned_weights_says_so(llama: tuple[nn.Module, PruningResult]) -> None:
    model, result = llama
    card = model_card(model, result, SavedModel("dense", 1, 1), fine_tuned_to_step=7)
    assert "fine-tuned after pruning, to training step 7, with the pruning masks held fixed" in card.text
    assert "not trained after pruning" not in card.text


def test_the_card_says_how_many_calibration_samples_were_read() -> None:
    """With fewer calibration samples than the config asks for, the card stated the settings ("`fine_samples` 64 for
    the fine step") as if that many had been read: the engine warned, but recorded nothing."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(8, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    config = PruningConfig(sparsity=0.5, coarse_samples=2, fine_samples=64)
    result = prune(model, [batch], lambda m, b: m(**b, labels=b["input_ids"]).loss, config)
    assert {stage: result.stages[stage].samples for stage in ("coarse", "fine")} == {"coarse": 2, "fine": 2}
    card = model_card(model, result, SavedModel("dense", 1, 1))
    assert "- **Calibration samples**: 2 for the coarse scores, 2 for the fine step (`fine_samples` 64)." in card.text
    unrecorded = {stage: replace(stats, samples=0) for stage, stats in result.stages.items()}  # an older report
    card = model_card(model, replace(result, stages=unrecorded), SavedModel("dense", 1, 1))
    assert "`coarse_samples` 2 for the coarse scores, `fine_samples` 64 for the fine step." in card.text


def test_the_card_says_how_many_samples_auto_held_out() -> None:
    """With fewer calibration samples than `auto_holdout_samples` asks for after the coarse and fine steps' batches,
    `auto` holds out those left (and warns), but the card said "`auto_holdout_samples` 8 held out to choose the
    allocation", the setting (CASES 240)."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(8, 100, (2, 8), generator=generator)} for _ in range(3)]
    config = PruningConfig(allocation="auto", coarse_samples=2, fine_samples=2, auto_holdout_samples=8)
    result = prune(model, batches, lambda m, b: m(**b, labels=b["input_ids"]).loss, config)
    assert result.stages["auto"].samples == 4  # the two batches after the first, which both steps read
    card = model_card(model, result, SavedModel("dense", 1, 1))
    assert "2 for the fine step, 4 held out to choose the allocation (`auto_holdout_samples` 8)." in card.text


def test_a_uniform_run_names_no_coarse_step_nor_cap_and_the_stacks_left_dense() -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(8, 100, (4, 8), generator=torch.Generator().manual_seed(0))}
    config = PruningConfig(sparsity=0.5, structure="2:4", importance="uniform", fine_samples=4)
    result = prune(model, [batch], lambda m, b: m(**b, labels=b["input_ids"]).loss, config)
    skipped = replace(result, skipped_stacks=("model.vision_tower.layers",))  # as a stack the loss never ran
    card = model_card(model, skipped, SavedModel("sparse-24-bitmask", 1, 1))

    assert "allocation `uniform`, fine step `wanda`, structure `2:4`, target sparsity 50.00%." in card.text
    assert "`coarse_samples`" not in card.text and "max_sparsity" not in card.text
    assert "- **Calibration samples**: 4 for the fine step." in card.text
    assert "Left dense (never ran in the calibration loss): `model.vision_tower.layers`." in card.text
    assert "compressed-tensors" in card.data.tags and "load_pruned_model" in card.text


@pytest.mark.parametrize(
    ("allocation", "importance", "named"),
    [
        # OWL reads no coarse scores, whatever `importance` says, so the card names none ("owl`, fine step").
        ("owl", "zeroth_order", "allocation `owl`, fine step"),
        ("auto", "first_order", "allocation `auto` (chose `{chosen}`) on `first_order` scores, fine step"),
        ("auto", "uniform", "allocation `auto` (chose `{chosen}`), fine step"),
    ],
)
def test_the_allocation_is_named_as_its_option_takes_it(allocation: str, importance: str, named: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(8, 100, (2, 8), generator=generator)} for _ in range(4)]
    config = PruningConfig(
        allocation=allocation, importance=importance, coarse_samples=4, fine_samples=4, auto_holdout_samples=4
    )
    result = prune(model, batches, lambda m, b: m(**b, labels=b["input_ids"]).loss, config)
    card = model_card(model, result, SavedModel("dense", 1, 1))

    assert named.format(chosen=result.chosen_candidate) in card.text
