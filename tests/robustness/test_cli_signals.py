"""Signals and offline mode reach ``ecoflap`` as a separate process, as they reach a user's run (see ``CASES.md``).

The entry point runs with INFO logging, so that the test can wait for the line that says pruning has started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.robustness.cli_runs import vit_config, vqa_config

ENTRY = "import logging; logging.basicConfig(level=logging.INFO); from ecoflap_pl.cli import main; main()"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def read_until(process: subprocess.Popen, marker: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    process.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGTERM, 143, "Stopped by SIGTERM"), (signal.SIGINT, 1, "KeyboardInterrupt")]
)
def test_a_signal_while_pruning_inside_validate_stops_at_once(tmp_path, demo_data, signum, code, said):
    config = vit_config(tmp_path, demo_data, probes=400)  # a coarse step of many forward passes: time to interrupt
    process = start("validate", "-c", config)
    lines = read_until(process, "weights to prune in")
    sent = time.monotonic()
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=60)
    output = "".join(lines) + rest
    assert time.monotonic() - sent < 30, output[-3000:]
    assert process.returncode == code, output[-3000:]
    assert said in output and "every weight was restored" in output
    assert not list((tmp_path / "run").rglob("pruning_report.json"))


def test_sigint_while_fine_tuning_says_what_save_to_holds(tmp_path, demo_data):
    save_to = tmp_path / "pruned"
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(save_to))
    process = start("fit", "-c", config, "--trainer.max_steps=100000", "--trainer.limit_val_batches=0")
    read_until(process, "Pruning report written to")
    deadline = time.monotonic() + 120
    while not (save_to / "pruning_report.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few optimizer steps
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output[-3000:]
    assert f"{save_to} holds the model as pruned BEFORE fine-tuning, not the fine-tuned one" in output
    assert "--ckpt_path" in output


def test_a_hub_name_in_offline_mode_says_offline(tmp_path, demo_data, blip2_dir):
    config = vqa_config(tmp_path, demo_data, blip2_dir)
    process = start(
        "validate",
        "-c",
        config,
        "--model.init_args.pretrained=Salesforce/not-a-cached-model",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 2, output[-3000:]
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in output
    assert len(output[output.index("error (") :].splitlines()) <= 4
    assert not Path(tmp_path / "run").exists()
