"""Say at once, in a few lines, that a hub model cannot be had: it is not in the cache, and the hub cannot be reached
or offline mode is on.

Left to itself, ``huggingface_hub`` (2.4 here) answers a file that is neither cached nor reachable with five more
tries spaced 1, 2, 4, 8 and 8 seconds apart, two warning lines each, before transformers raises "We couldn't connect
to ...": 14 lines and 23 seconds. No documented setting bounds those tries (``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` bound each request, not their number), and patching the library's private retry loop
would break with its next release; the tries are right, too, for a hub that answers slowly during a long download.
So, before a hub model that is not in the cache is loaded, :func:`check_hub_access` makes the one metadata request
the library itself starts with (which it sends without retries) and turns a failure into one message; a cached model
costs a look at the cache and no request. A model whose config is cached but none of whose weight files is (an
interrupted download, a copied cache without its blobs) counts as not cached: its load would wait through the same
retries for its weights. What retries remain (a file beyond those, such as a shard missing beside others, with the hub
unreachable) are one line for the duration of the load only (:func:`quiet_hub_retries`), which says why the load
waits, and the load's final error is the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".index")
"""File endings of the weight files (and their shard indexes) ``from_pretrained`` reads, from a local folder or a cached
snapshot (with a variant, a subfolder or shards too)."""
_RETRY_LOGGER = "huggingface_hub.utils._http"
_RETRY_MESSAGES = (" thrown while requesting ", "Retrying in ")


@dataclass(frozen=True)
class HubModel:
    """A model on the hub, and how the user named it.

    Attributes:
        repo_id: the hub repository.
        files: the files the load fetches first; the model counts as cached when one of them is (and a weight file
            beside it, see ``weight_suffixes``), and the first is the one requested to see whether the hub answers.
            ``config.json`` is the first file of every transformers model.
        option: the setting that named the model, quoted in messages.
        name: the model as the user wrote it, when that is not ``repo_id`` (a timm model name).
        local_copy: how to use a copy on disk instead, the last part of the hint.
        weight_suffixes: the name endings of the weight files the load fetches after ``files``; one such file must be
            in the cached snapshot too. Empty when ``files`` are the weights.
    """

    repo_id: str
    files: tuple[str, ...] = ("config.json",)
    option: str = "pretrained"
    name: str | None = None
    local_copy: str = "pass the folder of a local copy as `pretrained`"
    weight_suffixes: tuple[str, ...] = WEIGHT_SUFFIXES


def timm_hub_model(timm_model: str) -> HubModel | None:
    """The hub repository timm loads the weights of ``timm_model`` from (``None``: they come from elsewhere)."""
    from timm.models import get_pretrained_cfg

    local_copy = "load a local file with model_config: {pretrained_cfg_overlay: {file: /path/model.safetensors}}"
    if timm_model.startswith("hf-hub:"):  # timm reads the repository's config.json first
        return HubModel(timm_model.removeprefix("hf-hub:"), option="timm_model", local_copy=local_copy)
    pretrained_cfg = get_pretrained_cfg(timm_model, allow_unregistered=True)
    if pretrained_cfg is None or not pretrained_cfg.hf_hub_id or pretrained_cfg.file:
        return None
    # Without a file named in the config, timm asks for model.safetensors and falls back to pytorch_model.bin.
    files = (pretrained_cfg.hf_hub_filename,) if pretrained_cfg.hf_hub_filename else _TIMM_WEIGHTS
    return HubModel(pretrained_cfg.hf_hub_id, files, "timm_model", timm_model, local_copy, weight_suffixes=())


@contextmanager
def hub_model_errors(model: HubModel, *, revision: str | None = None, cache_dir: str | None = None) -> Iterator[None]:
    """Run the load of the hub ``model`` with its unavailability said at once, in a few lines.

    Before the block, a model that is not cached is refused when offline mode is on or the hub does not answer
    (:func:`check_hub_access`); in the block, the hub client's retries are one line (:func:`quiet_hub_retries`), and
    a file that turns out to be neither cached nor downloadable raises the same error.

    Raises:
        OSError: the model is not in the cache and cannot be downloaded.
    """
    check_hub_access(model, revision=revision, cache_dir=cache_dir)
    try:
        with quiet_hub_retries():
            yield
    except OSError as error:
        if not is_hub_unavailable(error):
            raise
        raise hub_unavailable(model, cache_dir) from error


def check_hub_access(model: HubModel, *, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Refuse the hub ``model`` now if it is not in the cache and cannot be downloaded.

    Raises:
        OSError: ``model`` is not cached (or only its config is), and offline mode is on or the hub does not answer.
    """
    snapshot = _cached_snapshot(model, revision, cache_dir)
    if snapshot is not None and _holds_weights(snapshot, model.weight_suffixes):
        return
    config_only = snapshot is not None
    if is_offline_mode():
        raise hub_unavailable(model, cache_dir, config_only=config_only)
    url = hf_hub_url(model.repo_id, model.files[0], revision=revision)
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return  # the hub answered (a missing or gated repo): the load says what is wrong
    except Exception as error:  # the HTTP client's connection and timeout errors, whose classes vary between versions
        raise hub_unavailable(model, cache_dir, error, config_only=config_only) from error


def _cached_snapshot(model: HubModel, revision: str | None, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder holding one of ``model.files``; ``None`` when none of them is cached."""
    for filename in model.files:
        found = try_to_load_from_cache(model.repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):  # not None, nor the marker of a file known to be absent from the repository
            return Path(found).parent
    return None


def _holds_weights(snapshot: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether ``snapshot`` holds a weight file (one whose name ends with one of ``suffixes``; any, when empty).

    Any such file counts, whatever its variant, subfolder or shard: the check must never refuse a model that loads
    from the cache. A link whose file is gone does not count.
    """
    return not suffixes or any(path.name.endswith(suffixes) and path.is_file() for path in snapshot.rglob("*"))


def hub_unavailable(
    model: HubModel, cache_dir: str | None = None, reason: BaseException | None = None, *, config_only: bool = False
) -> OSError:
    """The error for a hub model that is not in the cache and cannot be downloaded (offline, or the hub unreachable);
    ``config_only``: its config is in the cache, none of its weight files is."""
    cache = cache_dir or constants.HF_HUB_CACHE
    named = f"{model.name!r} (hub repository {model.repo_id!r})" if model.name else repr(model.repo_id)
    partly = ": its config is there, but none of its weight files" if config_only else ""
    if is_offline_mode():
        why = "offline mode is on (HF_HUB_OFFLINE=1), so it cannot be downloaded"
        first = "unset HF_HUB_OFFLINE to download it; or"
    else:
        why = f"the hub ({constants.ENDPOINT}) could not be reached" + (f": {reason}" if reason else "")
        first = "check the network or proxy; or"
    return OSError(
        f"`{model.option}` {named} is not in the local Hugging Face cache ({cache}{partly}), and {why}. HINT: {first} "
        f"run `hf download {model.repo_id}` on a machine with access and copy its cache folder here (set HF_HOME to "
        f"the copy); or {model.local_copy}."
    )


def is_hub_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or an error that caused it) says a file was neither cached nor downloadable."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _OneLineForRetries(logging.Filter):
    """Put one line of ours in place of the hub client's first retry warning, and turn the others into DEBUG records
    (dropped unless its logger shows DEBUG)."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not any(text in record.getMessage() for text in _RETRY_MESSAGES):
            return True
        if not self.said:
            self.said = True
            record.msg, record.args = _WAITING, (constants.ENDPOINT,)
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_WAITING = (
    "The Hugging Face hub (%s) does not answer, and a file of the model is not in the cache: the hub client tries "
    "again, with pauses of up to 8 s, for each such file. HINT: with the whole model in the cache, set "
    "HF_HUB_OFFLINE=1 to load it without the hub."
)


@contextmanager
def quiet_hub_retries() -> Iterator[None]:
    """Within the block, the hub client's retry warnings are one line (see :class:`_OneLineForRetries`); every other
    record is left as it is, and so is everything outside the block."""
    logger, retries = logging.getLogger(_RETRY_LOGGER), _OneLineForRetries()
    logger.addFilter(retries)
    try:
        yield
    finally:
        logger.removeFilter(retries)
