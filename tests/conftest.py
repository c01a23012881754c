"""Fixtures shared by the CLI and robustness tests: tiny data in the official layouts (the demo generator at a tiny
size) and a tiny BLIP-2 saved to disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Blip2Processor, BlipImageProcessor

from ecoflap_pl.demo.data import DemoPaths
from ecoflap_pl.demo.presets import PRESETS
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.models.tokenizers import train_tokenizer
from tests.distributed import free_port


@pytest.fixture(autouse=True)
def process_state_restored() -> Iterator[None]:
    """Each test leaves the environment variables and torch's thread count as it found them.

    Lightning's DDP launchers set ``MASTER_PORT`` in the process that starts the ranks (``ddp_spawn`` in a test: this
    one), ``seed_everything`` sets ``PL_GLOBAL_SEED``, and neither is removed: every later test, and every ``ecoflap``
    subprocess it starts, ran with the port and seed of an earlier one (a stale port another socket may hold by then).
    A test that sets one thread for its tiny models left every later test on one thread.

    Each test also gets its own ``MASTER_PORT``, below the kernel's ephemeral range (``tests.distributed.free_port``):
    without one, Lightning's launchers take a port the kernel hands out, which another socket may take before the
    process group binds it.
    """
    environment, threads = dict(os.environ), torch.get_num_threads()
    os.environ["MASTER_PORT"] = str(free_port())
    yield
    for name in set(os.environ) - set(environment):
        del os.environ[name]
    os.environ.update(environment)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoPaths:
    return replace(PRESETS["tiny"].data, train_images=16).build(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory, demo_data) -> Path:
    """A tiny BLIP-2 OPT with its processor, saved as ``save_pretrained`` writes a hub model."""
    corpus = demo_data.corpus.read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(corpus, vocab_size=128, template="bos")
    model = tiny_model("blip2_opt", vocab_size=128)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4
    )
    out = tmp_path_factory.mktemp("blip2") / "tiny-blip2-opt"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
