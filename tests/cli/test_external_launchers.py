"""``ecoflap`` started once per rank by ``torchrun`` or ``srun``: a refusal is printed whole on global rank 0 only,
one line on each other rank, and every rank ends with status 2; the command's warnings, ``--help``, ``--version`` and
``--print_config`` are printed on global rank 0 only.

Each rank is a separate process with the launcher's environment (done before any process group is created, so the
ranks need not meet); the tests named ``test_torchrun_*`` run the real ``torchrun``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ecoflap_pl.cli import main
from tests.distributed import free_port
from tests.robustness.cli_runs import vit_config

DDP_ON_TWO_CPUS = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def _torchrun_environment(rank: int, port: int) -> dict[str, str]:
    """What ``torchrun --nproc_per_node 2`` sets for ``rank`` (the variables Lightning's TorchElasticEnvironment
    detects and reads)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "ecoflap-test",
    }


def _srun_environment(rank: int, port: int) -> dict[str, str]:
    """What ``srun --ntasks 2`` on one node sets for task ``rank`` (variables Lightning's SLURMEnvironment reads)."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ecoflap",
        "SLURM_NODELIST": "localhost",
        "MASTER_PORT": str(port),
    }


def _without_launchers(environment: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in environment.items() if not key.startswith(("SLURM_", "TORCHELASTIC_"))}


def _torchrun(*args: str) -> tuple[int, str]:
    """``torchrun --nproc_per_node 2 -m ecoflap_pl ARGS``: its exit status, and its output and every rank's."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        + ["-m", "ecoflap_pl", *args],
        capture_output=True,
        text=True,
        env={**_without_launchers(dict(os.environ)), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    return run.returncode, run.stdout + run.stderr


def _run_ranks(launcher: str, *args: str) -> list[subprocess.CompletedProcess[str]]:
    """``ecoflap ARGS`` as ranks 0 and 1 of ``launcher``, started together. Once rank 0 has failed, rank 1 is stopped
    with SIGTERM as soon as it has said its refusal, as ``torchrun`` (and ``srun --kill-on-bad-exit``) stop the other
    ranks once one has exited."""
    environment = {"torchrun": _torchrun_environment, "srun": _srun_environment}[launcher]
    port = free_port()
    base = {**_without_launchers(dict(os.environ)), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        outputs = [(Path(folder, f"{rank}.out"), Path(folder, f"{rank}.err")) for rank in (0, 1)]
        processes = []
        for rank, (out, err) in enumerate(outputs):
            with out.open("w", encoding="utf-8") as stdout, err.open("w", encoding="utf-8") as stderr:
                command = [sys.executable, "-m", "ecoflap_pl", *args]
                processes.append(
                    subprocess.Popen(command, stdout=stdout, stderr=stderr, env={**base, **environment(rank, port)})
                )
        rank_0, rank_1 = processes
        if rank_0.wait(timeout=300) != 0:
            deadline = time.monotonic() + 240
            while rank_1.poll() is None and "[rank: 1] error" not in outputs[1][1].read_text(encoding="utf-8"):
                assert time.monotonic() < deadline, outputs[1][1].read_text(encoding="utf-8")[-3000:]
                time.sleep(0.05)
            if rank_1.poll() is None:
                rank_1.send_signal(signal.SIGTERM)
        rank_1.wait(timeout=300)
        return [
            subprocess.CompletedProcess(
                process.args, process.returncode, out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")
            )
            for process, (out, err) in zip(processes, outputs, strict=True)
        ]


@pytest.mark.parametrize(
    ("launcher", "option", "said"),
    [
        ("torchrun", "--pruning.sparsity=1.5", "`sparsity` must be in [0, 1)"),
        ("srun", "--pruning.sparsty=0.5", "HINT: did you mean 'pruning.sparsity'?"),
    ],
)
def test_a_refusal_is_printed_whole_on_rank_0_only(tmp_path, demo_data, launcher, option, said):
    """Every rank printed the same refusal whole: under torchrun or srun each rank runs the command."""
    config = vit_config(tmp_path, demo_data)
    first, second = _run_ranks(launcher, "validate", "-c", config, *DDP_ON_TWO_CPUS, option)
    assert first.returncode == second.returncode == 2, first.stderr[-3000:] + second.stderr[-3000:]
    assert said in first.stderr and "(ECOFLAP_DEBUG=1 shows the traceback)" in first.stderr, first.stderr[-3000:]
    assert "[rank: 1]" not in first.stderr
    shown = [line for line in second.stderr.splitlines() if "error (" in line or "HINT" in line or "ECOFLAP" in line]
    assert len(shown) == 1, second.stderr[-3000:]
    assert shown[0].startswith("[rank: 1] error (configuration error): ") and len(shown[0]) < 140, shown
    assert shown[0].endswith("(rank 0 prints the whole message)"), shown
    assert "Seed set to" not in first.stderr + second.stderr  # each rank said it, "[rank: N]" before Lightning's line
    assert not (tmp_path / "run").exists()


def test_a_rank_that_refused_first_waits_for_rank_0_and_ends_quietly_when_stopped(tmp_path, demo_data):
    """torchrun stops every rank once one has exited: where rank 1 refused first, rank 0 was stopped before it printed
    the whole message that rank 1's line points to. Rank 1 now waits; the launcher's SIGTERM (here the test's) ends
    the wait with the refusal's status, nothing more said."""
    config = vit_config(tmp_path, demo_data)
    stderr = tmp_path / "rank1.txt"
    rank_1_environment = _torchrun_environment(1, free_port())
    environment = {**_without_launchers(dict(os.environ)), "OMP_NUM_THREADS": "1", **rank_1_environment}
    with stderr.open("w", encoding="utf-8") as err:
        rank_1 = subprocess.Popen(
            [sys.executable, "-m", "ecoflap_pl", "validate", "-c", config, "--pruning.sparsity=1.5"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=environment,
        )
        deadline = time.monotonic() + 240
        while "[rank: 1] error" not in stderr.read_text(encoding="utf-8"):
            assert rank_1.poll() is None and time.monotonic() < deadline, stderr.read_text(encoding="utf-8")[-3000:]
            time.sleep(0.05)
        assert rank_1.poll() is None  # waiting for rank 0 (RANK_0_REFUSAL_WAIT_S)
        rank_1.send_signal(signal.SIGTERM)
        assert rank_1.wait(timeout=60) == 2
    said = [line for line in stderr.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(said) == 1, said  # no "Stopped by SIGTERM."
    assert said[0].startswith("[rank: 1] error (configuration error): `sparsity` must be in [0, 1)"), said
    assert said[0].endswith("(rank 0 prints the whole message)"), said


_EXIT_CODES = re.compile(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+) ")
"""torchrun's summary of a failed rank: its global rank and exit status."""


@pytest.mark.distributed
def test_torchrun_prints_a_refusal_met_after_the_process_group_once(tmp_path, demo_data):
    """The pruning callback's own checks (here: patterns that select no weight) run in ``setup``, on every rank once
    the process group exists; Lightning's launcher is None under torchrun, so the CLI cannot run them before."""
    config = vit_config(tmp_path, demo_data, include=["no_such_weight"])
    returncode, output = _torchrun("validate", "-c", config, *DDP_ON_TWO_CPUS)
    assert returncode != 0, output[-3000:]
    # Both ranks meet the refusal; whichever exits first, torchrun stops the other with SIGTERM. A rank so stopped
    # while the command runs says so and ends with status 143, its refusal printed or not; one stopped once its
    # refusal is printed, as the interpreter shuts down (Python has given SIGTERM its default action back), dies by
    # the signal (-15). The rank that failed first (torchrun's root cause) ended with the refusal's status.
    codes = {int(rank): int(code) for rank, code in _EXIT_CODES.findall(output)}
    assert codes.keys() == {0, 1} and set(codes.values()) <= {2, 143, -15}, output[-3000:]
    first = _EXIT_CODES.search(output, output.index("Root Cause (first observed failure)"))
    assert first is not None and first.group(2) == "2", output[-3000:]
    assert output.count("Stopped by SIGTERM.") == list(codes.values()).count(143), output[-3000:]
    # The whole refusal is printed once, by rank 0, which always gets to it: a rank 1 that refused first waits for it
    # (rank 1 stopped with its line said ends with 2 as well); rank 1 says one line at most.
    assert codes[0] == 2, output[-3000:]
    assert output.count("HINT") == output.count("(ECOFLAP_DEBUG=1 shows the traceback)") == 1, output[-3000:]
    assert "[rank: 0] error" not in output and output.count("[rank: 1] error (configuration error): ") <= 1
    if codes[1] != 143:
        assert "[rank: 1] error (configuration error): " in output, output[-3000:]
    assert not list(Path(tmp_path / "run").rglob("pruning_report.json"))


def test_help_is_printed_on_rank_0_only():
    """Every rank printed the whole help: about 750 lines for `validate --help`."""
    first, second = _run_ranks("torchrun", "validate", "--help")
    assert first.returncode == second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    assert "--ckpt_path" in first.stdout, first.stdout[-3000:]
    assert second.stdout == "", second.stdout[-3000:]


def test_the_printed_config_is_printed_on_rank_0_only(tmp_path, demo_data):
    """Every rank printed the whole merged config (jsonargparse writes it while the command line is parsed)."""
    first, second = _run_ranks("srun", "validate", "-c", vit_config(tmp_path, demo_data), "--print_config")
    assert first.returncode == second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    assert yaml.safe_load(first.stdout)["model"]["class_path"].endswith("ClassificationTask"), first.stdout
    assert second.stdout == "", second.stdout[-3000:]


def test_versions_are_printed_on_rank_0_only(capsys, monkeypatch):
    """As rank 1 of a launcher: the rank Lightning reads from its environment when imported."""
    for rank, printed in ((0, True), (1, False)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(SystemExit) as exit_:
            main(["--version"])
        assert exit_.value.code == 0
        assert ("lightning " in capsys.readouterr().out) is printed, rank


def test_a_warning_of_the_command_is_printed_on_rank_0_only(tmp_path, demo_data):
    """The command's own warnings (here: a `ckpt_path` whose hyperparameters replace the config's model arguments, said
    while the config is parsed, before a refused setting ends the run) were printed once per rank."""
    config = vit_config(tmp_path, demo_data)
    model = yaml.safe_load(Path(config).read_text(encoding="utf-8"))["model"]
    hyperparameters = {**model["init_args"], "model_config": {**model["init_args"]["model_config"], "depth": 3}}
    checkpoint = tmp_path / "deeper.ckpt"
    torch.save({"hyper_parameters": {**hyperparameters, "_class_path": model["class_path"]}}, checkpoint)
    first, second = _run_ranks(
        "torchrun", "validate", "-c", config, f"--ckpt_path={checkpoint}", "--pruning.sparsity=1.5"
    )
    assert first.returncode == second.returncode == 2, first.stderr[-3000:] + second.stderr[-3000:]
    replaced = "The checkpoint's hyperparameters replace these model arguments of the config: model_config"
    assert first.stderr.count(replaced) == 1, first.stderr[-3000:]
    assert replaced not in second.stderr, second.stderr[-3000:]
    assert "`sparsity` must be in [0, 1)" in first.stderr and "[rank: 1] error" in second.stderr


@pytest.mark.distributed
def test_torchrun_prints_a_warning_of_prune_once(tmp_path, demo_data):
    """`ecoflap prune` without `save_to` warns that the pruned model is not saved: each rank said it."""
    config = vit_config(tmp_path, demo_data, coarse_samples=8)  # a calibration batch of 4 for each rank
    returncode, output = _torchrun("prune", "-c", config, *DDP_ON_TWO_CPUS)
    assert returncode == 0, output[-3000:]
    assert output.count("`pruning.save_to` is not set: the pruned model is only reported, not saved.") == 1, output
    assert len(list(Path(tmp_path / "run").rglob("pruning_report.json"))) == 1
