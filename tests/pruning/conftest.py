"""Fixtures of the engine tests; the models and data themselves live in ``pruning_helpers``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.pruning.pruning_helpers import ToyModel, seeded_toy_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads spin-wait on each
    other (10-20x slower); run every engine test on one thread and give the setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_model() -> ToyModel:
    return seeded_toy_model()
