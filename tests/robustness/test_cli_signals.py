"""Signals and offline mode reach ``ecoflap`` as a separate process, as they reach a user's run (see ``CASES.md``).

The entry point runs with INFO logging, so that a test can wait for the line that says pruning has started.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ecoflap_pl.entry_point import SIGINT_STATUS
from tests.robustness.cli_runs import interruptible, vit_config, vqa_config

ENTRY = "import logging; logging.basicConfig(level=logging.INFO); from ecoflap_pl.cli import main; main()"


class Run:
    """``ecoflap ARGS`` as a separate process whose output goes to a file (read without blocking)."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("w", encoding="utf-8") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ENTRY, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                preexec_fn=interruptible,
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"{what} never happened:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> str:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.output()


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "Stopped by SIGTERM"), (signal.SIGINT, SIGINT_STATUS, "KeyboardInterrupt")],
)
def test_a_signal_while_pruning_inside_validate_stops_at_once(tmp_path, demo_data, signum, code, said):
    # A coarse step of about 360,000 forward passes (minutes): still running whenever the signal comes, however late
    # a loaded machine lets this test send it (400 probes, 8 s here, could end first); only the signal ends it early.
    config = vit_config(tmp_path, demo_data, probes=20_000)
    run = Run(tmp_path / "out.log", "validate", "-c", config)
    run.wait_for(lambda: "weights to prune in" in run.output(), "the start of pruning")
    sent = time.monotonic()
    run.process.send_signal(signum)
    output = run.finish(timeout=120)
    assert time.monotonic() - sent < 30, output[-3000:]  # at once: the step alone would run for minutes
    assert "Coarse step" not in output, output[-3000:]  # stopped inside the step, not after it
    assert run.process.returncode == code, output[-3000:]
    assert said in output and "every weight was restored" in output
    assert not list((tmp_path / "run").rglob("pruning_report.json"))


def test_sigint_while_fine_tuning_says_what_save_to_holds(tmp_path, demo_data):
    save_to = tmp_path / "pruned"
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(save_to))
    run = Run(tmp_path / "out.log", "fit", "-c", config, "--trainer.max_steps=100000", "--trainer.limit_val_batches=0")
    run.wait_for(lambda: (save_to / "pruning_report.json").is_file(), "the pruned model's save")
    time.sleep(1.0)  # a few optimizer steps
    run.process.send_signal(signal.SIGINT)
    output = run.finish(timeout=120)
    assert run.process.returncode == SIGINT_STATUS, output[-3000:]
    assert f"{save_to} holds the model as pruned BEFORE fine-tuning, not the fine-tuned one" in output
    assert "--ckpt_path" in output


def test_a_hub_name_in_offline_mode_says_offline(tmp_path, demo_data, blip2_dir):
    config = vqa_config(tmp_path, demo_data, blip2_dir)
    run = Run(
        tmp_path / "out.log",
        "validate",
        "-c",
        config,
        "--model.init_args.pretrained=Salesforce/not-a-cached-model",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    output = run.finish(timeout=240)
    assert run.process.returncode == 2, output[-3000:]
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in output
    assert len(output[output.index("error (") :].splitlines()) <= 4
    assert not Path(tmp_path / "run").exists()


@pytest.mark.parametrize(
    "env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"]
)
def test_a_hub_model_neither_cached_nor_reachable_is_a_short_error_at_once(tmp_path, env):
    """An experiment config as shipped, its data in place, the hub model missing from an empty cache: a few lines that
    name the model and the fix, before any work (the hub client alone would print 14 lines over 23 s)."""
    text = tmp_path / "text" / "wikitext-2-raw"
    text.mkdir(parents=True)
    for split in ("valid", "test"):
        (text / f"wiki.{split}.raw").write_text(" = Title = \n the cat sat on the mat .\n", encoding="utf-8")
    with gzip.open(tmp_path / "text" / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as c4:
        c4.write(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    config = Path(__file__).parents[2] / "configs" / "experiments" / "flant5xl_lm.yaml"
    run = Run(
        tmp_path / "out.log",
        "validate",
        "-c",
        str(config),
        "--trainer.accelerator=cpu",
        "--trainer.precision=32",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.init_args.data_dir={tmp_path / 'text'}",
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"), **env},
    )
    output = run.finish(timeout=240)
    assert run.process.returncode == 2, output[-3000:]
    lines = output.strip().splitlines()
    assert len(lines) <= 3 and "Retrying" not in output, output[-3000:]
    assert "`pretrained` 'google/flan-t5-xl' is not in the local Hugging Face cache" in lines[0]
    assert "HINT:" in lines[0] and "`hf download google/flan-t5-xl`" in lines[0]
    assert not (tmp_path / "run").exists()
