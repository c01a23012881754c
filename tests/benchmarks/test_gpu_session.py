"""The GPU session's script and its parts, run end to end at tiny scale on the CPU (``--tiny``).

A GPU lease is short, so ``benchmarks/gpu_session.py`` must work the first time it meets a GPU: every code path of
its parts (the full-size BLIP-2 zeroth/first-order/Wanda comparison, LLaVA pruned on one device, LLaVA with its
decoder blocks offloaded by Accelerate, the merge of the sections into benchmarks/RESULTS.md) runs here on tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_tiny_session_runs_every_part_and_writes_its_sections(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "benchmarks/gpu_session.py", "--tiny", "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert completed.returncode == 0, completed.stderr[-3000:] + log[-3000:]
    session = json.loads((tmp_path / "session.json").read_text())
    outcomes = {part["name"]: part["outcome"] for part in session["parts"]}
    assert list(outcomes) == ["sparse_speed", "opt", "flant5", "llava_7b", "llava_70b"]
    assert outcomes.pop("sparse_speed") == ("ok" if torch.cuda.is_available() else "needs a GPU")
    assert set(outcomes.values()) == {"ok"}, log[-3000:]

    for name, expected in (
        ("full_size_opt", ["first_order", "wanda", "zeroth_order"]),
        ("full_size_flant5", ["zeroth_order"]),
    ):
        methods = json.loads((tmp_path / f"{name}.json").read_text())["methods"]
        assert sorted(methods) == expected
        for method, data in methods.items():
            assert "error" not in data, (name, method, data)
            assert data["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
            assert ("coarse" in data["prune"]["stages"]) == (method != "wanda")
            # each coarse step is ranked against the exact gradient norms, over all blocks and within each tower
            if method != "wanda":
                assert set(data["spearman"]) == {"all", *data["prune"]["tower_sparsity"]}
                assert all(-1.0 <= rho <= 1.0 for rho in data["spearman"].values())
            else:
                assert "spearman" not in data

    on_device = json.loads((tmp_path / "llava_7b.json").read_text())["methods"]["zeroth_order"]
    assert on_device["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(on_device["prune"]["tower_sparsity"]) == {
        "model.vision_tower.encoder.layers",
        "model.language_model.layers",
    }

    offloaded = json.loads((tmp_path / "llava_70b.json").read_text())["methods"]
    assert sorted(offloaded) == ["wanda", "zeroth_order"]
    for data in offloaded.values():
        placement = data["placement"]
        # both decoder blocks of the tiny language model had their weights on disk while pruning
        assert placement["offloaded_blocks"] == ["model.language_model.layers.0", "model.language_model.layers.1"]
        assert placement["device_map"]["model.language_model.layers.1"] == "disk"
        assert placement["device_map"]["model.vision_tower"] == "cpu"
        assert data["prune"]["config"]["activation_storage"] == "cpu"
        assert data["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert data["pruned"]["loss"] == pytest.approx(data["pruned"]["loss"])  # finite

    fragment = (tmp_path / "gpu_sections.md").read_text()
    for heading in (
        "## Full-size BLIP-2 OPT-2.7B on a GPU",
        "## Full-size BLIP-2 FlanT5-XL on a GPU",
        "## Full-size LLaVA-1.5-7B on a GPU",
        "## A 70B-class LLaVA larger than the GPU: decoder blocks offloaded",
        "## GPU session: what ran",
    ):
        assert heading in fragment
    assert "| Wanda (uniform) |" in fragment and "peak / reference" in fragment
    results = tmp_path / "results.md"  # stands in for benchmarks/RESULTS.md
    results.write_text("# Benchmark results\n\n## Full-size BLIP-2 OPT-2.7B on a GPU\n\nH100 figures\n")
    refused = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_session.py",
            "--merge",
            str(tmp_path / "gpu_sections.md"),
            "--into",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "HINT" in refused.stderr  # a tiny run never replaces GPU figures
    assert "H100 figures" in results.read_text()


def test_merge_replaces_the_sessions_sections_and_keeps_the_others(tmp_path, benchmarks_on_path):
    import gpu_session

    results = tmp_path / "results.md"  # stands in for benchmarks/RESULTS.md
    results.write_text("# Benchmark results\n\n## Kept\n\nold kept\n\n## Replaced\n\nold\n\n## Also kept\n\nx\n")
    fragment = tmp_path / "gpu_sections.md"
    fragment.write_text("# Benchmark results\n\n## Replaced\n\nnew\n\n## Added\n\nrow\n")
    assert gpu_session.merge(str(fragment), str(results)) == ["## Replaced", "## Added"]
    text = results.read_text()
    assert "old kept" in text and "## Also kept\n\nx" in text
    assert "## Replaced\n\nnew" in text and "\nold\n" not in text
    assert text.rstrip().endswith("## Added\n\nrow")
    fragment.write_text("no sections\n")
    with pytest.raises(SystemExit, match="HINT"):
        gpu_session.merge(str(fragment), str(results))


def test_offload_device_map_sends_every_language_block_and_nothing_else(benchmarks_on_path):
    import llava_size

    args = llava_size.parse_args(["--scale", "tiny_offload", "--device", "cpu", "--offload", "disk", "--layers", "3"])
    with torch.device("meta"):
        model = llava_size.LlavaForConditionalGeneration(llava_size.llava_config(args))
    device_map = llava_size.offload_device_map(model, "disk", 0)
    offloaded = sorted(name for name, where in device_map.items() if where == "disk")
    assert offloaded == [f"model.language_model.layers.{index}" for index in range(3)]
    for name, _ in model.named_parameters():  # every weight placed exactly once
        assert sum(name == key or name.startswith(key + ".") for key in device_map) == 1, name


def test_cpu_offload_on_the_cpu_is_refused_with_a_hint(benchmarks_on_path, capsys):
    import llava_size

    with pytest.raises(SystemExit):
        llava_size.parse_args(["--scale", "tiny_offload", "--device", "cpu", "--offload", "cpu"])
    assert "HINT: use --offload disk" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("scale", "parameters", "block"),
    [
        ("7b", 7_063_427_072, 202_383_360),  # llava-hf/llava-1.5-7b-hf's parameter count; one LLaMA-7B block
        ("70b_offload", None, 855_654_400),  # one Llama-2-70B block (grouped-query attention, MLP 28672)
    ],
)
def test_full_size_llava_configs_have_the_published_shapes(benchmarks_on_path, scale, parameters, block):
    import llava_size

    args = llava_size.parse_args(["--scale", scale, "--device", "cpu", "--offload", "disk"])
    config = llava_size.llava_config(args)
    with torch.device("meta"):  # shapes only: no memory
        model = llava_size.LlavaForConditionalGeneration(config)
    if parameters is not None:
        assert sum(p.numel() for p in model.parameters()) == parameters
    assert sum(p.numel() for p in model.get_submodule("model.language_model.layers.0").parameters()) == block
    assert llava_size.image_tokens(config) == 576  # 336 px in patches of 14
