"""Build a model from a ``from_pretrained`` name (the real path) or from a config (tests, the demo)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ecoflap_pl.folders import first_subfolders
from ecoflap_pl.hardware_check import check_device_map
from ecoflap_pl.models.hub_access import WEIGHT_SUFFIXES, HubModel, hub_model_errors

ModelT = TypeVar("ModelT", bound=PreTrainedModel)
MODEL_FOLDERS = 64
"""How many subfolders of a ``pretrained`` folder without config.json are searched for a model to name."""


def expand_home(name_or_path: str | None) -> str | None:
    """A ``pretrained`` or ``tokenizer`` argument with a leading ``~`` expanded, as every local path is: a config file,
    which no shell expands, may name a saved model ``~/models/pruned``, and ``from_pretrained`` would take it for a
    malformed hub name."""
    return None if name_or_path is None else os.path.expanduser(name_or_path)


def check_model_source(pretrained: str | None, model_config: Any, example: str = "Salesforce/blip2-opt-2.7b") -> None:
    """Raise unless exactly one of ``pretrained`` (a hub name or directory) and ``model_config`` is given."""
    if (pretrained is None) == (model_config is None):
        raise ValueError(
            f"Exactly one of `pretrained` and `model_config` must be given, got pretrained={pretrained!r} and "
            f"model_config={'set' if model_config is not None else None}. HINT: name a model, e.g. "
            f"pretrained: {example}, or give its config to train from scratch."
        )


def check_tokenizer_source(model_config: Any, tokenizer: str | None) -> None:
    """A model built from ``model_config`` has no tokenizer of its own, so ``tokenizer`` must name one."""
    if model_config is not None and tokenizer is None:
        raise ValueError(
            "`tokenizer` must be given with `model_config`, got None. HINT: save a tokenizer with "
            "save_pretrained(dir) and pass that directory."
        )


def _looks_local(pretrained: str) -> bool:
    """A path rather than a hub name (``namespace/name``): absolute, relative to ``.``/``~``, or deeper than 2."""
    return pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or "\\" in pretrained


def check_model_folder(folder: Path) -> None:
    """Refuse a local ``pretrained`` folder that ``from_pretrained`` cannot load: one without ``config.json`` (the
    folder above the model's, or a data folder) or without weight files (the config and tokenizer copied alone).
    transformers says "Unrecognized model ... Should have a `model_type` key in its config.json" for the first, even
    when there is no config.json at all.

    Raises:
        FileNotFoundError: naming the folder, what it lacks and, when one of its subfolders holds a model, that one.
    """
    if not (folder / "config.json").is_file():
        models = [sub for sub in first_subfolders(folder, MODEL_FOLDERS) if (sub / "config.json").is_file()]
        where = (
            f"point `pretrained` at the model folder inside it: {', '.join(str(m) for m in models[:3])}"
            if models
            else "give the folder written by save_pretrained() or `--pruning.save_to`, or a hub name such as "
            "'Salesforce/blip2-opt-2.7b'"
        )
        raise FileNotFoundError(
            f"`pretrained` {str(folder)!r} is a folder without config.json, so it holds no model. HINT: {where}."
        )
    weights = [path.name for path in folder.iterdir() if path.name.endswith(WEIGHT_SUFFIXES) or ".index." in path.name]
    if not weights:
        raise FileNotFoundError(
            f"`pretrained` {str(folder)!r} holds config.json but no weight files ({', '.join(WEIGHT_SUFFIXES)}): "
            "the weights were not copied with it. HINT: copy the model's *.safetensors files (and their index) into "
            "it, or point `pretrained` at the complete folder."
        )


@contextmanager
def hub_load_errors(pretrained: str, **from_pretrained_kwargs: Any) -> Iterator[None]:
    """Run a ``from_pretrained(pretrained)`` call with the errors a user can act on.

    A local path that does not exist is refused before the hub client reports it as a malformed repo id. A hub name
    that is not in the cache is checked first: offline mode, or a hub that cannot be reached, ends the run at once with
    a few lines instead of the client's retries (:func:`~ecoflap_pl.models.hub_access.hub_model_errors`).

    Args:
        pretrained: a hub name or a local directory.
        from_pretrained_kwargs: the call's ``revision`` and ``cache_dir``, if any, say where the cache is looked up.

    Raises:
        FileNotFoundError: a local ``pretrained`` path that does not exist.
        OSError: the model is not in the cache and cannot be downloaded.
    """
    local = Path(pretrained).expanduser()
    if local.exists() or from_pretrained_kwargs.get("local_files_only"):
        if local.is_dir() and not from_pretrained_kwargs.get("subfolder"):
            check_model_folder(local)
        yield
        return
    if _looks_local(str(pretrained)):
        raise FileNotFoundError(
            f"`pretrained` {str(pretrained)!r} does not exist: it is a local path, not a hub name of the form "
            "'namespace/name'. HINT: give the directory written by save_pretrained(), or a hub name such as "
            "'Salesforce/blip2-opt-2.7b'."
        )
    revision, cache_dir = from_pretrained_kwargs.get("revision"), from_pretrained_kwargs.get("cache_dir")
    with hub_model_errors(HubModel(pretrained), revision=revision, cache_dir=cache_dir):
        yield


def load_pretrained(model_cls: type[ModelT], pretrained: str, **from_pretrained_kwargs: Any) -> ModelT:
    """``model_cls.from_pretrained(pretrained)``, through :func:`ecoflap_pl.export.load_pruned_model` for a folder that
    ``--pruning.save_to`` wrote in a sparse ``save_format`` (``from_pretrained`` cannot decode those).

    Args:
        model_cls: the Hugging Face class, an ``AutoModel*`` class too.
        pretrained: a hub name or a local directory.
        from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        ValueError: a ``device_map`` or ``max_memory`` naming a CUDA GPU where torch sees none.
    """
    from ecoflap_pl.export import is_sparse_export, load_pruned_model

    check_device_map(from_pretrained_kwargs.get("device_map"), from_pretrained_kwargs.get("max_memory"))
    with hub_load_errors(pretrained, **from_pretrained_kwargs):
        if is_sparse_export(pretrained):
            return cast(ModelT, load_pruned_model(Path(pretrained).expanduser(), model_cls, **from_pretrained_kwargs))
        return model_cls.from_pretrained(pretrained, **from_pretrained_kwargs)


def build_hf_model(
    model_cls: type[ModelT],
    pretrained: str | None = None,
    config: dict[str, Any] | PretrainedConfig | None = None,
    **from_pretrained_kwargs: Any,
) -> ModelT:
    """``model_cls.from_pretrained(pretrained)`` or a random-initialised ``model_cls(config)``.

    Args:
        model_cls: the Hugging Face class, e.g. ``Blip2ForConditionalGeneration``.
        pretrained: a hub name (``"Salesforce/blip2-opt-2.7b"``) or a local directory written by
            ``save_pretrained`` or by ``--pruning.save_to`` (any ``save_format``).
        config: a config object or its ``to_dict()``; the model is randomly initialised.
        from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``revision``, ...).

    Raises:
        ValueError: not exactly one of ``pretrained`` and ``config`` given.
    """
    check_model_source(pretrained, config)
    if pretrained is not None:
        return load_pretrained(model_cls, pretrained, **from_pretrained_kwargs)
    if isinstance(config, dict):
        config_class = model_cls.config_class
        if config_class is None:
            raise TypeError(
                f"{model_cls.__name__} names no config_class to read a dict config with. HINT: pass a config."
            )
        config = config_class.from_dict(config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"`config` must be a dict or a PretrainedConfig, got {type(config).__name__}.")
    return model_cls(config)


def placement_kwargs(
    device_map: str | dict[str, Any] | None, max_memory: dict[str, Any] | None, offload_folder: str | None
) -> dict[str, Any]:
    """``from_pretrained`` arguments of Accelerate's big-model placement (those given).

    Raises:
        ValueError: ``max_memory`` or ``offload_folder`` without ``device_map``.
        FileExistsError, PermissionError: an ``offload_folder`` that cannot be written (checked before the model is
            loaded, which writes there, as pruning does).
    """
    from ecoflap_pl.export import check_writable_folder

    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError(
            "`max_memory` and `offload_folder` must come with `device_map`, got device_map=None. HINT: "
            "device_map: auto."
        )
    if offload_folder is not None:
        check_writable_folder(offload_folder, option="offload_folder")
    caps = None if max_memory is None else _checked_max_memory(max_memory)
    given = {"device_map": device_map, "max_memory": caps, "offload_folder": offload_folder}
    return {key: value for key, value in given.items() if value is not None}


_MAX_MEMORY_HINT = (
    "HINT: map GPU numbers, 'cpu' or 'mps' to a size in bytes (10e9) or with a unit ('10GiB', '5GB'), e.g. "
    "--model.init_args.max_memory '{0: 20GiB, cpu: 60GiB}'; what does not fit goes to offload_folder."
)
_NAMED_DEVICES = ("cpu", "mps", "disk")


def _checked_max_memory(max_memory: dict[Any, Any]) -> dict[int | str, int]:
    """``max_memory`` as Accelerate reads it: GPU numbers as ints (a JSON config can only give ``"0"``), sizes in
    bytes. Accelerate refuses ``"0"`` as "not recognized" though it asks for integers, and names neither the option
    nor the entry of a size it cannot read (and refuses ``"10e9"``). A GPU on a machine without one is refused by
    :func:`~ecoflap_pl.hardware_check.check_device_map`.

    Raises:
        ValueError: a key that names no device, or a size that is not one.
    """
    checked: dict[int | str, int] = {}
    for key, size in max_memory.items():
        device: int | str = int(key) if str(key).isdigit() else str(key)
        if isinstance(device, str) and device not in _NAMED_DEVICES:
            raise ValueError(f"`max_memory` names the device {key!r}, which is no device. {_MAX_MEMORY_HINT}")
        checked[device] = _size_in_bytes(key, size)
    return checked


def _size_in_bytes(key: Any, size: Any) -> int:
    """A ``max_memory`` size in bytes: a number (``10e9``, also as a string) or a string with a unit (``"10GiB"``)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        number = float(size)
    except (TypeError, ValueError):
        number = None
    try:
        if isinstance(size, bool) or not isinstance(size, (int, float, str)):
            raise TypeError(size)
        count = int(number) if number is not None else int(convert_file_size_to_int(size))
        if count < 0:
            raise ValueError(count)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(
            f"`max_memory` gives {key!r} the size {size!r}, which is not one. {_MAX_MEMORY_HINT}"
        ) from error
    return count


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with an error that says what was looked for."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        where = "local directory" if Path(name_or_path).exists() else "hub name or local directory"
        raise FileNotFoundError(
            f"`tokenizer` could not be loaded from {name_or_path!r} ({where}): {error}. HINT: give the directory a "
            "tokenizer was saved to with save_pretrained(), or the model's hub name."
        ) from error


def text_vocab_size(config: PretrainedConfig) -> int:
    """Size of the text vocabulary the model embeds."""
    text_config = getattr(config, "text_config", None)
    return int((text_config if text_config is not None else config).vocab_size)


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, what: str, hint: str = "") -> None:
    """Refuse a tokenizer with more tokens than the model's text vocabulary.

    Args:
        tokenizer: the tokenizer the task encodes text with.
        config: the model's config.
        what: how the message names the tokenizer (``"`tokenizer`"``).
        hint: added to the message's hint.
    """
    if len(tokenizer) > text_vocab_size(config):
        raise ValueError(
            f"{what} has {len(tokenizer)} tokens, more than the model's text vocabulary ({text_vocab_size(config)}). "
            f"HINT: build the model config with vocab_size >= len(tokenizer){hint}."
        )
