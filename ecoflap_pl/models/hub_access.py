"""Say at once, in a few lines, that a hub model cannot be had: it is not in the cache, and the hub cannot be reached
or offline mode is on.

Left to itself, ``huggingface_hub`` answers a file that is neither cached nor reachable with five more tries spaced 1,
2, 4, 8 and 8 seconds apart, two warning lines each, before transformers raises "We couldn't connect to ...": 14
lines and 23 seconds. No documented setting bounds those tries (``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` bound each request, not their number), and patching the library's private retry loop
would break with its next release; the tries are right, too, for a hub that answers slowly during a long download.
So, before a hub name that is not in the cache is loaded, :func:`check_hub_access` makes the one metadata request
the library itself starts with (which it sends without retries) and turns a failure into one message; a cached name
costs a look at the cache and no request. What retries remain (a model whose config is cached but whose weights are
not, with the hub unreachable) are one line for the duration of the load only (:func:`quiet_hub_retries`), which says
why the load waits, and the load's final error is the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

_PROBED_FILE = "config.json"
"""The file every transformers model repo has, and the first one ``from_pretrained`` fetches."""
_RETRY_LOGGER = "huggingface_hub.utils._http"
_RETRY_MESSAGES = (" thrown while requesting ", "Retrying in ", "Rate limited. Waiting ")


def check_hub_access(name: str, *, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Refuse the hub name ``name`` now if it is not in the cache and cannot be downloaded.

    Raises:
        OSError: ``name`` is not cached, and offline mode is on or the hub does not answer.
    """
    if try_to_load_from_cache(name, _PROBED_FILE, cache_dir=cache_dir, revision=revision) is not None:
        return
    if is_offline_mode():
        raise hub_unavailable(name, cache_dir)
    try:
        get_hf_file_metadata(hf_hub_url(name, _PROBED_FILE, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return  # the hub answered (a missing or gated repo): from_pretrained says what is wrong
    except Exception as error:  # the HTTP client's connection and timeout errors, whose classes vary between versions
        raise hub_unavailable(name, cache_dir, error) from error


def hub_unavailable(name: str, cache_dir: str | None = None, reason: BaseException | None = None) -> OSError:
    """The error for a hub name that is not in the cache and cannot be downloaded (offline, or the hub unreachable)."""
    cache = cache_dir or constants.HF_HUB_CACHE
    if is_offline_mode():
        why = "offline mode is on (HF_HUB_OFFLINE=1), so it cannot be downloaded"
        first = "unset HF_HUB_OFFLINE to download it; or"
    else:
        why = f"the hub ({constants.ENDPOINT}) could not be reached" + (f": {reason}" if reason else "")
        first = "check the network or proxy; or"
    return OSError(
        f"`pretrained` {name!r} is not in the local Hugging Face cache ({cache}), and {why}. HINT: {first} run "
        f"`hf download {name}` on a machine with access and copy its cache folder here (set HF_HOME to the copy); or "
        "pass the folder of a local copy as `pretrained`."
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
