"""Fixtures shared by the CLI and robustness tests: tiny data in the official layouts (the demo generator at a tiny
size) and a tiny BLIP-2 saved to disk."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import Blip2Processor, BlipImageProcessor

from ecoflap_pl.demo.data import DemoPaths
from ecoflap_pl.demo.presets import PRESETS
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.models.tokenizers import train_tokenizer


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
