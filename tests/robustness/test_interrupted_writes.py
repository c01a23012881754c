"""A real signal reaching ``ecoflap`` (a separate process) while it prunes before ``fit`` or writes ``save_to`` or
the report, or a write the kernel refuses: the run ends with one line and its exit status, the weights are restored,
and every folder holds its previous content or nothing, never a part of the new one (see ``CASES.md``)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ecoflap_pl.entry_point import SIGINT_STATUS
from tests.robustness.cli_runs import folder_digest, interruptible, vit_config

CHILD = Path(__file__).with_name("signal_at.py")
REPORT = ("pruning_report.json", "pruning_sparsity.png")


def signalled(tmp_path: Path, where: str, signame: str, *args: str, call: int = 1) -> tuple[int, str]:
    """Run ``ecoflap ARGS`` that sends itself ``signame`` at the ``call``-th call of ``where``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, str(CHILD), where, signame, str(call), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        preexec_fn=interruptible,
    )
    output = run.stdout + run.stderr
    assert f"sending {signame} at {where}" in output, output[-3000:]
    return run.returncode, output


def ecoflap_prune(config: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """``ecoflap prune -c CONFIG`` as a separate process (``preexec_fn`` runs in it before the program starts)."""
    return subprocess.run(
        [sys.executable, "-m", "ecoflap_pl.cli", "prune", "-c", config],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
        preexec_fn=preexec_fn,
    )


@pytest.fixture(scope="module")
def previous_export(tmp_path_factory, demo_data) -> Path:
    """A complete ``save_to`` folder of an earlier run, and its report."""
    root = tmp_path_factory.mktemp("previous")
    config = vit_config(root, demo_data, importance="uniform", sparsity=0.3, save_to=str(root / "pruned"))
    run = ecoflap_prune(config)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    ("signame", "code", "said", "existing"),
    [
        ("SIGTERM", 143, "Stopped by SIGTERM.", False),
        ("SIGTERM", 143, "Stopped by SIGTERM.", True),
        ("SIGINT", SIGINT_STATUS, "Detected KeyboardInterrupt", True),
    ],
)
def test_a_signal_while_save_to_is_written_leaves_it_as_it_was(
    tmp_path, demo_data, previous_export, signame, code, said, existing
):
    """SIGTERM before the Trainer's loops start (pruning and saving run in `on_fit_start`) killed the process at once:
    status -15, no message, and the half-written folder left beside the target."""
    target = tmp_path / "pruned"
    if existing:
        shutil.copytree(previous_export / "pruned", target)
    before = folder_digest(target) if existing else None
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(target), overwrite=True)
    # After the weights, before the masks: the new folder is half written.
    code_seen, output = signalled(tmp_path, "ecoflap_pl.export.checkpoint:_write_masks", signame, "prune", "-c", config)
    assert code_seen == code, output[-3000:]
    assert said in output
    assert f"`fit` stopped at step 0: nothing from this run was saved to {target}" in output
    assert "Traceback" not in output
    if existing:
        assert folder_digest(target) == before
    else:
        assert not target.exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial folder left


def test_sigterm_while_pruning_before_fit_restores_the_weights_and_says_so(tmp_path, demo_data):
    target = tmp_path / "pruned"
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(target))
    # The third weight about to change: two are pruned already.
    code, output = signalled(
        tmp_path, "ecoflap_pl.pruning.transaction:WeightTransaction.save", "SIGTERM", "fit", "-c", config, call=3
    )
    assert code == 143, output[-3000:]
    assert "every weight was restored" in output and "Stopped by SIGTERM." in output
    assert "`fit` stopped before pruning finished: weights unchanged" in output
    assert not target.exists() and not list(tmp_path.rglob("pruning_report.json"))


def test_sigint_while_the_report_is_written_leaves_the_previous_report_whole(tmp_path, demo_data, previous_export):
    """The JSON was written in place before the plot: an interrupt between them left the new JSON beside the
    previous run's plot."""
    shutil.copytree(previous_export / "run", tmp_path / "run")
    before = folder_digest(tmp_path / "run")
    config = vit_config(tmp_path, demo_data, importance="uniform")
    code, output = signalled(tmp_path, "ecoflap_pl.reporting:plot_sparsity", "SIGINT", "prune", "-c", config)
    assert code == SIGINT_STATUS, output[-3000:]
    after = folder_digest(tmp_path / "run")
    assert {name: after[name] for name in REPORT} == {name: before[name] for name in REPORT}
    assert not [path.name for path in (tmp_path / "run").iterdir() if path.name.startswith(".")]


def test_a_write_refused_by_the_kernel_names_save_to_and_leaves_it_as_it_was(tmp_path, demo_data, previous_export):
    """The kernel refuses the write past a size, as a full disk does (ENOSPC on a full tmpfs gives the same path):
    safetensors raised its own error type, shown as a 20-line traceback."""
    target = tmp_path / "pruned"
    shutil.copytree(previous_export / "pruned", target)
    before = folder_digest(target)
    config = vit_config(tmp_path, demo_data, importance="uniform", save_to=str(target), overwrite=True)
    limit = (target / "model.safetensors").stat().st_size // 2  # the weights file cannot be written whole

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = ecoflap_prune(config, preexec_fn=limit_file_size)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    error = output[output.index("error (") :]
    assert f"error (OSError): The pruned model could not be written to {target} (" in error
    assert f"{target} is as it was before. HINT: free space" in error and "Traceback" not in output
    assert folder_digest(target) == before
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    ("signame", "code", "said"),
    [("SIGINT", SIGINT_STATUS, "Stopped by SIGINT (Ctrl+C)."), ("SIGTERM", 143, "Stopped by SIGTERM.")],
)
def test_a_signal_before_the_trainer_starts_is_one_line(tmp_path, demo_data, signame, code, said):
    """Ctrl+C while the config is read or the model built ended with a KeyboardInterrupt traceback."""
    config = vit_config(tmp_path, demo_data)
    code_seen, output = signalled(tmp_path, "ecoflap_pl.cli:check_config_files", signame, "validate", "-c", config)
    assert code_seen == code, output[-3000:]
    assert said in output and "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_sigterm_while_a_refusal_is_printed_is_one_line(tmp_path, demo_data):
    """``torchrun`` stops the other ranks once one has failed: a rank stopped while it printed its own refusal was
    killed by the default handler (status -15, nothing said)."""
    config = vit_config(tmp_path, demo_data, sparsity=1.5)
    code, output = signalled(tmp_path, "ecoflap_pl.cli:refusal_on_this_rank", "SIGTERM", "validate", "-c", config)
    assert code == 143, output[-3000:]
    assert output.rstrip().endswith("Stopped by SIGTERM."), output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()
