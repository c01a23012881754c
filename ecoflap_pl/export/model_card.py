"""The model card (``README.md``) of a ``save_to`` folder: what the Hugging Face Hub shows for the uploaded folder.

Its metadata (``library_name``, ``base_model``, ``tags``) and text are built with ``huggingface_hub``'s
``ModelCard``; every figure on it is read from the run's :class:`~ecoflap_pl.pruning.PruningResult` (as
``pruning_report.json`` gives it), the :class:`~ecoflap_pl.export.SavedModel` and the report's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from ecoflap_pl.export.checkpoint import INDEX_FILE, MASKS_FILE, SavedModel, _is_hf_model
from ecoflap_pl.pruning import PruningResult
from ecoflap_pl.reporting import REPORT_JSON, REPORT_PLOT, block_rows, excluded_by

MODEL_CARD = "README.md"
_FORMATS = {
    "dense": "`dense`: zeros in place, an ordinary checkpoint",
    "sparse-bitmask": "compressed-tensors `sparse-bitmask`: each pruned weight as its kept values and a bitmask",
    "sparse-24-bitmask": (
        "compressed-tensors `sparse-24-bitmask`: each pruned weight as its 2-of-4 kept values and a bitmask"
    ),
}
_FOLDER = "path/to/this/folder"


def write_model_card(
    directory: str | Path,
    model: nn.Module,
    result: PruningResult,
    saved: SavedModel,
    metadata: Mapping[str, Any] | None = None,
    *,
    fine_tuned_to_step: int | None = None,
) -> Path:
    """Write the model card of the export in ``directory`` as ``README.md``, once the model
    (:func:`~ecoflap_pl.export.write_pruned_model`, which returned ``saved``) and the report
    (:func:`~ecoflap_pl.reporting.write_report`) are there: the card lists the folder's files.

    Args:
        directory: the folder being written.
        model: the pruned model.
        result: its pruning result.
        saved: what ``write_pruned_model`` wrote.
        metadata: the report's metadata (``ecoflap_pl_version``, ``created``, ...).
        fine_tuned_to_step: the training step the weights were fine-tuned to after pruning (the masks held fixed);
            ``None`` for weights as pruned.

    Returns:
        The card's path.
    """
    directory = Path(directory)
    card = model_card(model, result, saved, metadata, files=_files(directory), fine_tuned_to_step=fine_tuned_to_step)
    path = directory / MODEL_CARD
    card.save(path)
    return path


def model_card(
    model: nn.Module,
    result: PruningResult,
    saved: SavedModel,
    metadata: Mapping[str, Any] | None = None,
    *,
    files: list[str] | tuple[str, ...] = (),
    fine_tuned_to_step: int | None = None,
) -> ModelCard:
    """The model card of ``model`` exported with ``result`` in the folder holding ``files`` (paths relative to it);
    arguments as :func:`write_model_card`."""
    library = _library(model)
    tags = ["pruned", *(["sparse"] if result.overall_sparsity else []), "ecoflap", result.config.method]
    if saved.save_format != "dense":
        tags.append("compressed-tensors")
    data = ModelCardData(library_name=library, base_model=_hub_id(model), tags=tags)
    sections = [
        _summary(model, result, fine_tuned_to_step),
        _towers(result),
        _files_table(files, saved),
        _usage(model, library, saved.save_format),
        _provenance(metadata or {}),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _library(model: nn.Module) -> str | None:
    if _is_hf_model(model):
        return "transformers"
    return "timm" if type(model).__module__.split(".")[0] == "timm" else None


def _hub_id(model: nn.Module) -> str | None:
    """The Hub repository a Hugging Face model was loaded from: its ``name_or_path`` when that is ``owner/name`` and
    no local folder; ``None`` for a model built from a config (no ``name_or_path``) or loaded from a folder."""
    name = getattr(model, "name_or_path", None) if _is_hf_model(model) else None
    if not isinstance(name, str) or name.count("/") != 1 or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _allocation(result: PruningResult) -> str:
    """How the group sparsities were chosen, as the ``allocation`` option names it: the strategy, the candidate
    ``auto`` kept, and the coarse scores it read (the console's short label calls the paper's rule by its scores)."""
    config = result.config
    text = f"allocation `{config.allocation}`"
    if result.chosen_candidate is not None:
        text += f" (chose `{result.chosen_candidate}`)"
    if result.group_scores:
        text += f" on `{config.importance}` scores"
    return text


def _summary(model: nn.Module, result: PruningResult, fine_tuned_to_step: int | None) -> str:
    """The title, the sparsity reached, how it was pruned and on how many calibration samples."""
    config = result.config
    candidates = sum(result.sizes.values())
    zeros = round(result.overall_sparsity * candidates)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    lines = [
        f"# {type(model).__name__} pruned with ECoFLaP",
        "",
        f"{_pct(result.overall_sparsity)} of the model's {candidates:,} candidate weights (the Linear weights of its "
        f"transformer blocks that pruning considered) are zero: {zeros:,} weights, "
        f"{_pct(zeros / parameters if parameters else 0.0)} of all its {parameters:,} parameters.",
    ]
    if result.prior_sparsity:
        lines[-1] += f" {_pct(result.prior_sparsity)} of the candidate weights were already zero before pruning."
    # max_sparsity caps the paper's rule on coarse scores only: allocation ecoflap, importance not uniform.
    capped = config.allocation == "ecoflap" and config.importance != "uniform"
    cap = f", max_sparsity {_pct(config.max_sparsity)}" if capped and config.max_sparsity is not None else ""
    samples = [_samples_read(result, "fine", "for the fine step")]
    if "coarse" in result.stages:
        samples.insert(0, _samples_read(result, "coarse", "for the coarse scores"))
    if "auto" in result.stages:
        samples.append(_samples_read(result, "auto", "held out to choose the allocation", "auto_holdout_samples"))
    if fine_tuned_to_step is None:
        weights = "as pruned, not trained after pruning."
    else:
        weights = (
            f"fine-tuned after pruning, to training step {fine_tuned_to_step}, with the pruning masks held fixed (the "
            "pruned weights stayed zero)."
        )
    lines += [
        "",
        "- **Method**: ECoFLaP (Sung, Yoon, Bansal, *ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for "
        f"Vision-Language Models*, ICLR 2024): {_allocation(result)}, fine step `{config.method}`, "
        f"structure `{config.structure}`, target sparsity {_pct(config.sparsity)}{cap}.",
        f"- **Calibration samples**: {', '.join(samples)}.",
        f"- **Weights**: {weights}",
    ]
    return "\n".join(lines)


def _samples_read(result: PruningResult, stage: str, what: str, setting: str | None = None) -> str:
    """How many calibration samples ``stage`` read, with its ``setting`` (default ``{stage}_samples``) where that
    differs (fewer samples given, or whole batches holding more); only the setting for a report that did not record
    the count."""
    setting = setting or f"{stage}_samples"
    asked = getattr(result.config, setting)
    read = result.stages[stage].samples
    if not read:
        return f"`{setting}` {asked} {what}"
    return f"{read} {what}" + ("" if read == asked else f" (`{setting}` {asked})")


def _towers(result: PruningResult) -> str:
    """Per tower: its candidate weights and their achieved sparsity; the stacks left dense below."""
    rows = block_rows(result)
    achieved = result.tower_sparsity()
    lines = ["## Sparsity per tower", "", "| tower | candidate weights | achieved sparsity |", "|---|---:|---:|"]
    for tower in result.towers:
        weights = sum(row.params for row in rows if row.tower == tower)
        lines.append(f"| `{tower or '<root>'}` | {weights:,} | {_pct(achieved[tower])} |")
    if result.excluded_stacks:
        stacks = ", ".join(f"`{stack}`" for stack in result.excluded_stacks)
        lines += ["", f"Left dense by {excluded_by(result, quote='`')}: {stacks}."]
    if result.skipped_stacks:
        stacks = ", ".join(f"`{stack}`" for stack in result.skipped_stacks)
        lines += ["", f"Left dense (never ran in the calibration loss): {stacks}."]
    return "\n".join(lines + ["", f"![Achieved sparsity per block]({REPORT_PLOT})"])


def _files(directory: Path) -> list[str]:
    """Every file in ``directory`` (but a model card), as a path relative to it."""
    paths = (path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    return sorted(path for path in paths if path != MODEL_CARD)


def _files_table(files: list[str] | tuple[str, ...], saved: SavedModel) -> str:
    """What each file of the folder holds; the weights with their size on disk beside the dense size."""
    weights = [name for name in files if name.startswith("model") and name.endswith(".safetensors")]
    share = saved.weights_bytes / max(saved.dense_bytes, 1)
    described = {
        INDEX_FILE: "the index of the weight files",
        "config.json": "the model's configuration"
        + (" (with the compressed-tensors `quantization_config`)" if saved.save_format != "dense" else ""),
        "generation_config.json": "the generation settings",
        MASKS_FILE: "the pruning masks, 1 bit per candidate weight (`ecoflap_pl.export.read_masks(folder)`)",
        REPORT_JSON: "the pruning report: per-weight target and achieved sparsity, allocation, cost of each stage",
        REPORT_PLOT: "the achieved sparsity of each block, one line per tower",
    }
    rows = [
        f"| {', '.join(f'`{name}`' for name in weights) or 'weights'} | the pruned weights "
        f"({_FORMATS[saved.save_format]}); {_megabytes(saved.weights_bytes)} on disk, {100 * share:.0f}% of the "
        f"{_megabytes(saved.dense_bytes)} they take stored dense |"
    ]
    rows += [f"| `{name}` | {what} |" for name, what in described.items() if name in files]
    others = [name for name in files if name not in described and name not in weights]
    if others:
        rows.append(f"| {', '.join(f'`{name}`' for name in others)} | the tokenizer / processor |")
    return "\n".join(["## Files", "", "| file | content |", "|---|---|", *rows])


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB ({size:,} bytes)"


def _usage(model: nn.Module, library: str | None, save_format: str) -> str:
    """How to load the folder, as the README's table "load it with" says: ``from_pretrained`` or
    ``safetensors.torch.load_model`` for ``dense``, ``ecoflap_pl.export`` for the sparse formats."""
    name = type(model).__name__
    if library == "transformers" and save_format == "dense":
        code = [
            _import(model),
            "",
            f'model = {name}.from_pretrained("{_FOLDER}")  # or the Hub repository it was uploaded to',
        ]
        note = "`ecoflap_pl.export.load_pruned_model(folder)` loads it too, and `read_masks(folder)` reads its masks."
    elif library == "transformers":
        # load_pruned_model finds the class by the name config.json records, among transformers' own classes.
        own = _import(model).startswith("from transformers ")
        code = [
            "from ecoflap_pl.export import load_pruned_model",
            *([] if own else [_import(model)]),
            "",
            f'model = load_pruned_model("{_FOLDER}"{"" if own else f", model_class={name}"})  # a dense {name}',
        ]
        note = (
            "`from_pretrained` cannot decode this format (transformers 5 loads the pruned weights as missing, at "
            "random); from the Hub, download the folder first (`huggingface_hub.snapshot_download`)."
        )
    else:
        architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        from_timm = library == "timm" and architecture is not None
        build = f'timm.create_model("{architecture}", pretrained=False)' if from_timm else f"{name}()"
        code = ["import timm" if from_timm else _import(model), *_state_dict_loading(save_format, build)]
        note = "Build the model with the arguments it was pruned with (number of classes, image size, ...)."
    return "\n".join(["## How to load it", "", "```python", *code, "```", "", note])


def _import(model: nn.Module) -> str:
    """The import of ``model``'s class: from ``transformers`` where it exports it, else from the class's module."""
    import transformers

    model_class = type(model)
    module = "transformers" if getattr(transformers, model_class.__name__, None) is model_class else None
    return f"from {module or model_class.__module__} import {model_class.__name__}"


def _state_dict_loading(save_format: str, build: str) -> list[str]:
    """The lines loading the folder's state dict into a timm or plain module."""
    if save_format == "dense":
        return [
            "from safetensors.torch import load_model",
            "",
            f"model = {build}",
            f'load_model(model, "{_FOLDER}/model.safetensors")',
        ]
    return [
        "from ecoflap_pl.export import load_pruned_state_dict",
        "",
        f"model = {build}",
        f'state_dict, masks = load_pruned_state_dict("{_FOLDER}")',
        "model.load_state_dict(state_dict)  # strict=False where the model ties weights",
    ]


def _provenance(metadata: Mapping[str, Any]) -> str:
    """The ecoflap-pl version and the date of the pruning run, as its report's metadata record them."""
    version, created = metadata.get("ecoflap_pl_version"), metadata.get("created")
    if not version and not created:
        return ""
    said = (f" with ecoflap-pl {version}" if version else "") + (f" on {created}" if created else "")
    return f"Pruned{said}; `{REPORT_JSON}` holds the full record."
