"""A hub model that is not in the cache is refused at once when the hub cannot be reached or offline mode is on; a
cached one loads without the hub. The hub client reads its settings when imported, so each case runs in a child
process with its own environment; no test reaches the network."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download
from transformers import T5Config, T5ForConditionalGeneration

from ecoflap_pl.models.hub_access import quiet_hub_retries, timm_hub_model
from ecoflap_pl.models.loading import hub_load_errors

CHILD = """
import sys, time
from transformers import AutoModelForSeq2SeqLM
from ecoflap_pl.models.loading import load_pretrained
from ecoflap_pl.tasks import ClassificationTask
from ecoflap_pl.tasks.model_config import load_config
started = time.monotonic()
try:
    if sys.argv[1].startswith("timm:"):
        ClassificationTask(sys.argv[1].removeprefix("timm:"), pretrained=True)
    else:
        load_config(sys.argv[1], None)
        load_pretrained(AutoModelForSeq2SeqLM, sys.argv[1])
    print("loaded")
except OSError as error:
    print(error)
print(f"seconds {time.monotonic() - started:.1f}")
"""
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: nothing listens, the connection is refused
OFFLINE = {"HF_HUB_OFFLINE": "1"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def load_in_child(name: str, cache: Path, env: dict[str, str]) -> tuple[list[str], str]:
    """The lines the child printed on stdout, and its stderr."""
    settings = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    settings.update({"HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env})
    child = subprocess.run(
        [sys.executable, "-c", CHILD, name], capture_output=True, text=True, env=settings, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout.splitlines(), child.stderr


def cache_a_tiny_model(cache: Path, name: str, *, weights: bool) -> None:
    """Lay out ``cache`` as ``hf download name`` would: a tiny T5's config, and its weights if ``weights``."""
    repo = cache / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    config = T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4, vocab_size=32)
    if weights:
        T5ForConditionalGeneration(config).save_pretrained(snapshot)
    else:
        config.save_pretrained(snapshot)


@pytest.mark.parametrize("env", [UNREACHABLE, OFFLINE], ids=["unreachable", "offline"])
def test_a_model_neither_cached_nor_reachable_is_refused_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    lines, stderr = load_in_child("google/flan-t5-xl", tmp_path / "empty-cache", env)
    message, seconds = lines
    assert message.startswith("`pretrained` 'google/flan-t5-xl' is not in the local Hugging Face cache")
    reason = "offline mode is on (HF_HUB_OFFLINE=1)" if env is OFFLINE else "http://127.0.0.1:9) could not be reached"
    assert reason in message
    assert "HINT:" in message and "`hf download google/flan-t5-xl`" in message and "HF_HOME" in message
    assert float(seconds.split()[1]) < 5  # the client's own retries sleep 23 s in all
    assert "Retrying" not in stderr and "thrown while requesting" not in stderr


def test_a_timm_model_neither_cached_nor_reachable_is_refused_at_once(tmp_path: Path) -> None:
    lines, stderr = load_in_child("timm:eva_giant_patch14_224.clip_ft_in1k", tmp_path / "empty-cache", UNREACHABLE)
    message, seconds = lines
    assert message.startswith(
        "`timm_model` 'eva_giant_patch14_224.clip_ft_in1k' (hub repository 'timm/eva_giant_patch14_224.clip_ft_in1k') "
        "is not in the local Hugging Face cache"
    )
    assert "`hf download timm/eva_giant_patch14_224.clip_ft_in1k`" in message and "pretrained_cfg_overlay" in message
    assert float(seconds.split()[1]) < 5
    assert "Retrying" not in stderr and "thrown while requesting" not in stderr


def test_timm_names_map_to_the_repository_and_files_timm_loads() -> None:
    tagged = timm_hub_model("eva_giant_patch14_224.clip_ft_in1k")
    assert tagged is not None and tagged.repo_id == "timm/eva_giant_patch14_224.clip_ft_in1k"
    assert tagged.files == ("model.safetensors", "pytorch_model.bin") and tagged.option == "timm_model"
    default_tag = timm_hub_model("vit_base_patch16_224")
    assert default_tag is not None and default_tag.repo_id.startswith("timm/vit_base_patch16_224.")
    from_hub = timm_hub_model("hf-hub:someone/my-vit")
    assert from_hub is not None and (from_hub.repo_id, from_hub.files) == ("someone/my-vit", ("config.json",))
    assert timm_hub_model("no_such_model_anywhere") is None  # timm's own error names it


def test_a_cached_model_loads_while_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    cache_a_tiny_model(tmp_path / "cache", "someone/tiny-t5", weights=True)
    lines, stderr = load_in_child("someone/tiny-t5", tmp_path / "cache", UNREACHABLE)
    assert lines[0] == "loaded" and float(lines[1].split()[1]) < 5, lines
    assert "Retrying" not in stderr


@pytest.mark.parametrize("env", [UNREACHABLE, OFFLINE], ids=["unreachable", "offline"])
def test_a_model_whose_config_alone_is_cached_is_refused_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    """Only the config is cached (an interrupted download): the check let the load start, which then waited through
    the client's retries for the weights (23 s, with a line saying so) before the short error."""
    cache_a_tiny_model(tmp_path / "cache", "someone/tiny-t5", weights=False)
    lines, stderr = load_in_child("someone/tiny-t5", tmp_path / "cache", env)
    message, seconds = lines
    assert message.startswith(
        f"`pretrained` 'someone/tiny-t5' is not in the local Hugging Face cache ({tmp_path / 'cache'}: its config is "
        "there, but none of its weight files), and "
    )
    reason = "offline mode is on (HF_HUB_OFFLINE=1)" if env is OFFLINE else "http://127.0.0.1:9) could not be reached"
    assert reason in message and "HINT:" in message and "`hf download someone/tiny-t5`" in message
    assert float(seconds.split()[1]) < 5
    assert "does not answer" not in stderr and "Retrying" not in stderr and "thrown while requesting" not in stderr


def test_a_model_cached_in_shards_loads_offline(tmp_path: Path) -> None:
    """Any weight file counts (shards, variants, subfolders): the check must not refuse a model that loads from the
    cache."""
    cache_a_tiny_model(tmp_path / "cache", "someone/tiny-t5", weights=False)
    snapshot = next((tmp_path / "cache").rglob("config.json")).parent
    config = T5Config.from_pretrained(snapshot)
    T5ForConditionalGeneration(config).save_pretrained(snapshot, max_shard_size="1KB")
    assert not (snapshot / "model.safetensors").exists() and len(list(snapshot.glob("model-*.safetensors"))) > 1
    lines, _ = load_in_child("someone/tiny-t5", tmp_path / "cache", OFFLINE)
    assert lines[0] == "loaded", lines


def test_a_file_missing_from_a_cached_model_during_the_load_is_the_same_short_error(tmp_path: Path) -> None:
    """The model is cached, so the check lets the load start; a file the load then cannot have gets the same message."""
    cache = tmp_path / "cache"
    cache_a_tiny_model(cache, "someone/tiny-t5", weights=True)
    refused = r"'someone/tiny-t5' is not in the local Hugging Face cache .* HINT: .*hf download"
    with pytest.raises(OSError, match=refused), hub_load_errors("someone/tiny-t5", cache_dir=str(cache)):
        hf_hub_download("someone/tiny-t5", "tokenizer.json", cache_dir=cache, local_files_only=True)
    assert json.loads(next(cache.rglob("config.json")).read_text())["d_model"] == 8


def test_retry_warnings_are_one_line_only_within_the_load(caplog: pytest.LogCaptureFixture) -> None:
    hub = logging.getLogger("huggingface_hub.utils._http")
    retry = "'[Errno 111] Connection refused' thrown while requesting HEAD http://127.0.0.1:9/x/resolve/main/y"
    with caplog.at_level(logging.WARNING, logger=hub.name):
        with quiet_hub_retries():
            for _ in range(2):
                hub.warning(retry)
                hub.warning("Retrying in 1s [Retry 1/5].")
            hub.warning("something else")
        hub.warning("Retrying in 2s [Retry 2/5].")
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 3 and said[1:] == ["something else", "Retrying in 2s [Retry 2/5]."]
    assert said[0].startswith("The Hugging Face hub (") and "HINT: with the whole model in the cache" in said[0]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=hub.name), quiet_hub_retries():
        hub.warning(retry)
        hub.warning(retry)
    assert [record.levelname for record in caplog.records] == ["WARNING", "DEBUG"]
    assert caplog.records[1].getMessage() == retry
