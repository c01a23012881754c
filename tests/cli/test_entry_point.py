"""The ``ecoflap`` console script and ``python -m ecoflap_pl`` start light, so a Ctrl+C (or a SIGTERM) at any moment,
the seconds spent importing torch, Lightning and transformers included, ends the run with one line and status 130
(143)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from ecoflap_pl.entry_point import SIGINT_STATUS, SIGTERM_STATUS
from tests.robustness.cli_runs import interruptible

CONSOLE_SCRIPT = Path(sysconfig.get_path("scripts")) / "ecoflap"
"""The script ``pip install`` wrote from ``[project.scripts]``, beside the interpreter running the tests."""

_TORCH_IMPORTED = re.compile(r"^import time:.*\|\s*torch$", re.MULTILINE)
"""The line ``-X importtime`` writes once ``import torch`` is done: the command is then importing Lightning."""


def test_the_package_and_its_entry_point_import_no_torch():
    code = "import sys, ecoflap_pl, ecoflap_pl.entry_point; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_package_names_load_on_first_use():
    code = "import ecoflap_pl; print(ecoflap_pl.prune.__module__, 'prune' in dir(ecoflap_pl)); ecoflap_pl.nothing"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["ecoflap_pl.pruning.pipeline", "True"]
    assert "AttributeError: module 'ecoflap_pl' has no attribute 'nothing'" in run.stderr


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [
        (signal.SIGINT, SIGINT_STATUS, "Stopped by SIGINT (Ctrl+C)."),
        (signal.SIGTERM, SIGTERM_STATUS, "Stopped by SIGTERM."),
    ],
    ids=["SIGINT", "SIGTERM"],
)
@pytest.mark.parametrize(
    "command", [[str(CONSOLE_SCRIPT)], [sys.executable, "-m", "ecoflap_pl"]], ids=["console_script", "python_-m"]
)
def test_a_signal_while_the_command_imports_is_one_line(tmp_path, command, signum, status, line):
    """The console script imported the whole CLI before any handler ran: a Ctrl+C then printed the import's traceback
    and the process died by the signal; a SIGTERM (``torchrun`` stopping the other ranks when one fails) killed it
    without a word (status -15)."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w", encoding="utf-8") as err:
        process = subprocess.Popen(
            [*command, "validate", "-c", str(tmp_path / "config.yaml")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPROFILEIMPORTTIME": "1"},
            preexec_fn=interruptible,
        )
        deadline = time.monotonic() + 120
        while not _TORCH_IMPORTED.search(stderr.read_text(encoding="utf-8")):
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text(encoding="utf-8")[-3000:]
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, _ = process.communicate(timeout=120)
    said = [text for text in stderr.read_text(encoding="utf-8").splitlines() if not text.startswith("import time:")]
    assert process.returncode == status == 128 + signum, said[-40:]
    assert said[-1:] == [line], said[-40:]
    assert not [text for text in said if "Traceback" in text or "KeyboardInterrupt" in text], said[-40:]
    assert stdout == ""
