"""Write a pruned model in one of the save formats, and read it back (weights and masks).

Formats (``save_format``):

- ``"dense"``: today's layout, zeros in place. A Hugging Face model is written with ``save_pretrained`` (load it with
  ``from_pretrained``), any other module (timm, plain PyTorch) as ``model.safetensors``. The masks go beside it in
  ``masks/pruning_masks.safetensors``.
- ``"sparse-bitmask"`` / ``"sparse-24-bitmask"``: the pruned weights in the ``compressed-tensors`` sparse layouts
  (:mod:`ecoflap_pl.export.sparse_formats`), every other tensor as is, in ``model*.safetensors`` whose metadata
  names the format; a Hugging Face model also gets its ``config.json`` (with the ``quantization_config`` block that
  ``compressed-tensors`` <= 0.14 reads) and generation config. :func:`load_pruned_model` loads it back as an
  ordinary dense model; :func:`load_pruned_state_dict` gives the dense state dict of any module.

The dense format keeps its masks in a subfolder, ``masks/pruning_masks.safetensors``, because serving engines such
as vLLM load every top-level ``*.safetensors`` of a folder that has no shard index (a single-file model) as weights;
tensors named like the model's weights there would be loaded over them. Folders written before kept the masks at the
top level (``pruning_masks.safetensors``); :func:`read_masks` still reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from ecoflap_pl.export.file_modes import umask_modes
from ecoflap_pl.export.sparse_formats import (
    FORMATS,
    compress_state_dict,
    decompress_state_dict,
    is_two_four,
    pack_mask,
    read_bitmasks,
    unpack_mask,
)
from ecoflap_pl.pruning.masks import masks_sparsity

SAVE_FORMATS = ("dense", *FORMATS)
MASKS_FILE = "masks/pruning_masks.safetensors"
LEGACY_MASKS_FILE = "pruning_masks.safetensors"
STATE_DICT_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FORMAT_KEY = "sparse_format"


def check_save_format(save_format: str, structure: str) -> str:
    """Return ``save_format`` if it is known and fits masks of ``structure`` (``"unstructured"`` or ``"N:M"``).

    Raises:
        ValueError: an unknown format, or ``"sparse-24-bitmask"`` for masks that are not 2:4.
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(
            f"`save_format` must be one of {list(SAVE_FORMATS)}, got {save_format!r}. HINT: 'dense' loads anywhere "
            "with from_pretrained; 'sparse-bitmask' stores any mask compactly; 'sparse-24-bitmask' stores 2:4 masks."
        )
    if save_format == "sparse-24-bitmask" and structure != "2:4":
        raise ValueError(
            f"`save_format` 'sparse-24-bitmask' stores 2:4 masks, but `structure` is {structure!r}. HINT: prune with "
            "structure '2:4', or save with save_format 'sparse-bitmask' (any pattern)."
        )
    return save_format


def check_masks_fit_save_format(masks: Mapping[str, torch.Tensor], save_format: str, source: str) -> None:
    """Refuse masks that ``save_format`` cannot store, before the work that ends in the write: masks read from a saved
    model or a checkpoint follow the structure they were pruned with, not the run's ``structure`` that
    :func:`check_save_format` checked.

    Raises:
        ValueError: ``"sparse-24-bitmask"`` and a mask that is not 2:4, naming it and ``source``.
    """
    if save_format != "sparse-24-bitmask":
        return
    misfit = next((name for name, mask in masks.items() if not is_two_four(mask)), None)
    if misfit is not None:
        raise ValueError(
            f"`save_format` 'sparse-24-bitmask' stores 2:4 masks, but the masks from {source} are not 2:4 (the mask of "
            f"{misfit!r} is not): the model could not be saved at the end, so the run stops before it starts. HINT: "
            "save with save_format 'sparse-bitmask' (any pattern), or prune the dense model with structure '2:4'."
        )


@dataclass(frozen=True)
class SavedModel:
    """What :func:`write_pruned_model` wrote.

    Attributes:
        save_format: the format.
        weights_bytes: size on disk of the model's weight files.
        dense_bytes: size of the same weights stored dense (every tensor once, in its dtype).
    """

    save_format: str
    weights_bytes: int
    dense_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def tensor_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The bytes ``state_dict``'s tensors take, each storage once."""
    # Tied weights share their memory; tensors without memory (``meta``: offloaded weights) count once per object, so
    # pass the model's own tensors (``state_dict(keep_vars=True)``), in which a tied offloaded weight is one Parameter.
    unique = {tensor.data_ptr() or id(tensor): tensor.numel() * tensor.element_size() for tensor in state_dict.values()}
    return sum(unique.values())


def model_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s weights stored dense: every tensor of its state dict once, a tied weight (one
    Parameter under several names) once, offloaded (``meta``) ones included."""
    return tensor_bytes(model.state_dict(keep_vars=True))


def least_export_bytes(model: nn.Module, save_format: str, sparsity: float) -> int:
    """A lower bound of what :func:`write_pruned_model` writes for ``model`` pruned to ``sparsity`` of its candidate
    weights: its weights stored dense; a sparse format keeps at least ``1 - sparsity`` of their values."""
    dense = model_bytes(model)
    return dense if save_format == "dense" else int(dense * (1 - sparsity))


def write_pruned_model(
    model: nn.Module,
    directory: str | Path,
    masks: dict[str, torch.Tensor],
    save_format: str = "dense",
    processors: Iterable[object] = (),
) -> SavedModel:
    """Write ``model`` (pruned with ``masks``) into the existing ``directory`` in ``save_format``.

    Every ``processors`` object with a ``save_pretrained`` method (tokenizer, processor) is saved beside it. The files
    and folders written get the modes of the umask (:func:`~ecoflap_pl.export.file_modes.umask_modes`), as a plain
    ``open()`` gives, though ``safetensors`` creates its files readable by their owner only.

    Raises:
        ValueError: an unknown format, or a mask that does not fit it.
    """
    directory = Path(directory)
    if save_format not in SAVE_FORMATS:
        check_save_format(save_format, "unstructured")
    state_dict = model.state_dict()
    hf_model = _is_hf_model(model)
    with umask_modes(directory):
        if save_format == "dense":
            if hf_model:
                model.save_pretrained(directory)  # type: ignore[operator]
            else:
                save_model(model, str(directory / STATE_DICT_FILE))
            _write_masks(masks, directory / MASKS_FILE)
        else:
            from huggingface_hub import save_torch_state_dict

            from ecoflap_pl.models.placement import StoredTensors

            if hf_model:
                state_dict = _without_tied_copies(model, state_dict)
            # Offloaded weights (``device_map``) are read from their store as each is compressed.
            compressed = compress_state_dict(StoredTensors(model, state_dict), masks, save_format)
            if hf_model:
                _write_hf_configs(model, directory, save_format, masks)
            save_torch_state_dict(compressed, directory, metadata={"format": "pt", _FORMAT_KEY: save_format})
        for processor in processors:
            save = getattr(processor, "save_pretrained", None)
            if callable(save):
                save(directory)
    weights = sum(path.stat().st_size for path in directory.glob("model*.safetensors"))
    return SavedModel(save_format, weights, model_bytes(model))


def _without_tied_copies(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` less the tied copies ``save_pretrained`` leaves out (it keeps e.g. the input embedding, not
    ``lm_head``), so that loaders which tie weights after loading, as ``from_pretrained`` does, find the kept name."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(state_dict, model)  # type: ignore[arg-type]


def _write_hf_configs(model: nn.Module, directory: Path, save_format: str, masks: dict[str, torch.Tensor]) -> None:
    model.config.save_pretrained(directory)  # type: ignore[union-attr, operator]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(directory)
    dense_linears = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" not in masks
    )
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "transform_config": {},
        "sparsity_config": {
            "format": save_format,
            "global_sparsity": masks_sparsity(masks),
            "sparsity_structure": "2:4" if save_format == "sparse-24-bitmask" else "unstructured",
            "targets": ["Linear"],
            "ignore": dense_linears,
        },
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    packed = {name: pack_mask(mask.bool()) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    save_file(packed, str(path), metadata={"shapes": json.dumps(shapes)})


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open(path)``, with a damaged file reported by name instead of by the reader's bare message."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ValueError(
            f"{path} cannot be read as a safetensors file ({error}). HINT: the folder was changed after `save_to` "
            "wrote it, or copied incompletely; export the model again."
        ) from error


def _weight_files(directory: Path) -> list[Path]:
    """The folder's weight files: the shards its index lists (every one must be there), else ``model*.safetensors``."""
    index = _read_index(directory)
    if index is not None:
        shards = sorted({directory / str(name) for name in (index.get("weight_map") or {}).values()})
        missing = [path.name for path in shards if not path.is_file()]
        if missing or not shards:
            raise FileNotFoundError(
                f"{directory} is incomplete: its {INDEX_FILE} lists weight files that are not there "
                f"({', '.join(missing) or 'it lists none'}). HINT: the folder was copied in part or a file was "
                "removed; copy the whole folder again, or export the model again."
            )
        return shards
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No model*.safetensors in {directory}. HINT: pass a folder written by `save_to` (ecoflap prune)."
        )
    return files


def _read_index(directory: Path) -> dict[str, Any] | None:
    """The shard index of a model stored in several files; ``None`` for a single-file model."""
    path = directory / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a shard index (JSON): {error}. HINT: export the model again.") from error
    if not isinstance(index, dict):
        raise ValueError(f"{path} is not a shard index (a JSON object). HINT: export the model again.")
    return index


def saved_format(directory: str | Path) -> str:
    """The save format of a folder written by :func:`write_pruned_model`.

    A model stored in several shards (over ``huggingface_hub``'s 5 GB per file) records it in its index only:
    ``huggingface_hub`` writes the metadata there, not into the shards.

    Raises:
        FileNotFoundError: no weight file, or a shard of the index missing.
    """
    directory = Path(directory)
    files = _weight_files(directory)
    index = _read_index(directory)
    if index is not None:
        return str((index.get("metadata") or {}).get(_FORMAT_KEY, "dense"))
    with _opened(files[0]) as handle:
        return (handle.metadata() or {}).get(_FORMAT_KEY, "dense")


def is_sparse_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose weights :func:`write_pruned_model` stored in a sparse format.

    Such a folder needs :func:`load_pruned_model`: a plain ``from_pretrained`` cannot decode it (see that function).
    """
    directory = Path(path).expanduser()
    return directory.is_dir() and any(directory.glob("model*.safetensors")) and saved_format(directory) != "dense"


def has_saved_masks(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write_pruned_model` with its masks: a dense one with its masks
    file, or a sparse one (whose bitmasks are the masks). A plain ``save_pretrained`` folder has none."""
    directory = Path(path).expanduser()
    if not directory.is_dir() or not any(directory.glob("model*.safetensors")):
        return False
    return saved_format(directory) != "dense" or _masks_file(directory) is not None


def _masks_file(directory: Path) -> Path | None:
    """The masks file of a dense folder written by :func:`write_pruned_model` (or by an earlier version, at its top
    level); ``None`` when it has none."""
    return next((directory / name for name in (MASKS_FILE, LEGACY_MASKS_FILE) if (directory / name).is_file()), None)


def load_pruned_state_dict(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense state dict and the masks (by weight name) of a folder written by :func:`write_pruned_model`.

    For modules without ``from_pretrained`` (timm): ``model.load_state_dict(state_dict)``; tensors that share
    storage in the model (tied weights) are stored once, so pass ``strict=False`` where the model ties weights.
    """
    directory = Path(directory)
    state_dict: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        with _opened(path) as handle:
            state_dict.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    save_format = saved_format(directory)
    if save_format == "dense":
        return state_dict, read_masks(directory)
    return decompress_state_dict(state_dict, save_format)


def read_masks(directory: str | Path) -> dict[str, torch.Tensor]:
    """The pruning masks (``True`` = kept) stored in a folder written by :func:`write_pruned_model`."""
    directory = Path(directory)
    if saved_format(directory) != "dense":
        # Only the bitmasks and shapes are read: decoding the whole state dict would hold a dense copy of every weight.
        parts: dict[str, torch.Tensor] = {}
        for weight_file in _weight_files(directory):
            with _opened(weight_file) as handle:
                names = [name for name in handle.keys() if name.endswith((".bitmask", ".shape"))]  # noqa: SIM118
                parts.update({name: handle.get_tensor(name) for name in names})
        return read_bitmasks(parts)
    path = _masks_file(directory)
    if path is None:
        raise FileNotFoundError(
            f"No {MASKS_FILE} in {directory}. HINT: pass a folder written by `save_to` (ecoflap prune) with its "
            "masks/ subfolder."
        )
    with _opened(path) as handle:
        shapes = json.loads((handle.metadata() or {})["shapes"])
        masks = {name: unpack_mask(handle.get_tensor(name), tuple(shapes[name])) for name in handle.keys()}  # noqa: SIM118
    _check_masks_fit_the_weights(directory, path, masks)
    return masks


def _check_masks_fit_the_weights(directory: Path, path: Path, masks: dict[str, torch.Tensor]) -> None:
    """Refuse a masks file that belongs to another model than the folder's weights (compared by the weight files'
    headers only: no tensor is read). The masks name the model's parameters, but ``save_pretrained`` may store them
    under other names (transformers' key mappings: a LLaVA is saved under its hub checkpoint's names); then the names
    and shapes are those of the model the folder's ``config.json`` builds, on the meta device. A mask named like no
    weight is let through alone, but not when none fits.

    Raises:
        ValueError: a mask whose weight has another shape, or masks none of which names a stored weight.
    """
    stored: dict[str, list[int]] = {}
    for weight_file in _weight_files(directory):
        with _opened(weight_file) as handle:
            stored.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})  # noqa: SIM118
    if masks.keys() - stored.keys() and (directory / "config.json").is_file():
        stored.update(_parameter_shapes(directory))
    wrong = [name for name, mask in masks.items() if name in stored and list(mask.shape) != stored[name]]
    if wrong or (masks and not any(name in stored for name in masks)):
        shown = (
            f"{wrong[0]!r} is {list(masks[wrong[0]].shape)} there but {stored[wrong[0]]} in the weights"
            if wrong
            else "none of its masks names a stored weight"
        )
        raise ValueError(
            f"{path} does not belong to the model in {directory}: {shown}. HINT: the masks file was copied from "
            "another export; export the model again, or put back the masks written with these weights."
        )


def _parameter_shapes(directory: Path) -> dict[str, list[int]]:
    """The shape of every tensor of the model the folder's ``config.json`` builds, by the model's own names (built on
    the meta device: no memory, no weight read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = _saved_model_class(directory)._from_config(config)
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def load_pruned_model(directory: str | Path, model_class: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a Hugging Face model written by :func:`write_pruned_model`, in any save format, as a dense model.

    A sparse folder is decoded here because no ``from_pretrained`` of transformers 5 can: transformers 5 hands only the
    quantization fields of ``quantization_config`` to ``compressed-tensors`` (>= 0.15, which has no sparse
    decompressors either), so without that package it raises ImportError, and with it it loads the model with the
    pruned weights missing, initialised at random (its load report lists them as MISSING). No field of the folder can
    turn that into an error without also breaking the readers of the format (``compressed-tensors`` 0.14 accepts no
    other keys in ``quantization_config``).

    Args:
        directory: the ``save_to`` folder.
        model_class: the ``transformers`` class (an ``AutoModel*`` class too); default the class named in
            ``config.json`` (``architectures``).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        TypeError: ``model_class`` is made for another config class than the saved model's.
    """
    import transformers

    directory = Path(directory)
    if model_class is None:
        model_class = _saved_model_class(directory)
    save_format = saved_format(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    _check_model_class(model_class, config, directory)
    if save_format == "dense":
        return model_class.from_pretrained(directory, **from_pretrained_kwargs)
    del config.quantization_config  # the weights are decompressed here, not by a quantizer
    if not issubclass(model_class, transformers.PreTrainedModel):  # an Auto class: the class it picks for config
        model_class = model_class._model_mapping[type(config)]
    state_dict, _ = load_pruned_state_dict(directory)
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **from_pretrained_kwargs)
    # As from_pretrained(directory) records it: the pruning callback finds the folder's masks through it.
    model.name_or_path = model.config.name_or_path = str(directory)
    return model


def _check_model_class(model_class: Any, config: Any, directory: Path) -> None:
    """Refuse a ``model_class`` that cannot hold the saved model: ``from_pretrained`` would fail deep inside
    transformers (``'dict' object has no attribute 'to_dict'``, a missing config attribute, a bare ``KeyError``).

    Raises:
        TypeError: a class that is not a ``transformers`` model class, or one built for another config class.
    """
    import transformers

    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        fits = model_class.config_class is None or isinstance(config, model_class.config_class)
    else:  # an Auto class maps config classes to model classes
        mapping = getattr(model_class, "_model_mapping", None)
        fits = mapping is not None and type(config) in mapping
    if not fits:
        name = getattr(model_class, "__name__", repr(model_class))
        saved = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise TypeError(
            f"`model_class` {name} cannot load the model in {directory}: that is a {saved} (its config.json holds a "
            f"{type(config).__name__}). HINT: leave model_class out (the class config.json names is used), or pass "
            f"a class made for {type(config).__name__} (transformers.{saved}, or an Auto class that maps it)."
        )


def _saved_model_class(directory: Path) -> Any:
    """The ``transformers`` class named by ``architectures`` in the folder's ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` (a missing folder, or a timm / plain module's state dict).
        ValueError: a ``config.json`` that names no ``transformers`` class.
    """
    import transformers

    path = directory / "config.json"
    if not path.is_file():
        what = "holds no Hugging Face model" if any(directory.glob("model*.safetensors")) else "is not a save_to folder"
        raise FileNotFoundError(
            f"{directory} has no config.json: it {what}. HINT: load a timm or plain module's folder with "
            "load_pruned_state_dict(dir) and model.load_state_dict(state_dict); else pass a folder written by "
            "`save_to` (ecoflap prune)."
        )
    try:
        architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or [None]
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a model config (a JSON object): {error}. HINT: export the model again."
        ) from error
    model_class = getattr(transformers, str(architectures[0]), None)
    if model_class is None:
        raise ValueError(
            f"{path} names the architecture {architectures[0]!r}, which this transformers version does not have. "
            "HINT: pass model_class= (e.g. transformers.AutoModelForCausalLM), or upgrade transformers."
        )
    return model_class
