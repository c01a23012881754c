"""The robustness cases run on one thread, as the engine tests do."""

from tests.pruning.conftest import one_thread  # noqa: F401 (an autouse fixture: importing it applies it here)
