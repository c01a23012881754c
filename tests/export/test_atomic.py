"""``save_to`` writes: killed at any point, the folder is the old one or the complete new one; checks before work."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecoflap_pl.export import atomic, atomic_directory, check_save_target, check_writable_folder

CHILD = Path(__file__).with_name("write_tiny_model.py")
KILL_POINTS = ["weights:after", "report:after", "card:after", "sync:after", "swap:before", "exchange:after"]
"""Inside the model write, after the report, after the model card, after the flush, just before the swap, just after
it."""


def checksum(folder: Path) -> str:
    """One digest of every file's relative path and bytes under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def write(target: Path, kill_at: str = "none", seed: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(CHILD), str(target), kill_at, str(seed)], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Complete writes with seed 0 (the old folder) and seed 1 (the new one), in ``seed0/`` and ``seed1/``."""
    root = tmp_path_factory.mktemp("reference")
    for seed in (0, 1):
        run = write(root / f"seed{seed}", seed=seed)
        assert run.returncode == 0, run.stderr[-2000:]
    assert checksum(root / "seed0") != checksum(root / "seed1")
    return root


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_write_killed_at_any_step_leaves_the_old_folder_or_the_new_one(
    tmp_path: Path, reference: Path, kill_at: str
) -> None:
    old, new = checksum(reference / "seed0"), checksum(reference / "seed1")
    target = tmp_path / "pruned"
    shutil.copytree(reference / "seed0", target)

    killed = write(target, kill_at, seed=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checksum(target) == (new if kill_at == "exchange:after" else old)
    left = sorted(path.name for path in tmp_path.iterdir() if path.name != "pruned")
    assert [name.split("-")[0] for name in left] == [".pruned.partial", ".pruned.writer"]  # its partial and lock file

    if kill_at == "sync:after":  # the next write cleans up after the killed one
        assert write(target, seed=1).returncode == 0
        assert checksum(target) == new
        assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


def test_a_write_killed_at_random_moments_never_mixes(tmp_path: Path, reference: Path) -> None:
    old, new = checksum(reference / "seed0"), checksum(reference / "seed1")
    target = tmp_path / "pruned"
    shutil.copytree(reference / "seed0", target)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen = set()
    for delay in (0.0, 0.02, 0.1):
        seed = 1 if checksum(target) == old else 0
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(target), "none", str(seed)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        seen.add(checksum(target))
        assert seen <= {old, new}


def test_an_exception_inside_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "pruned"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "config.json").write_text("new")
        raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


@pytest.mark.parametrize("old_files", [False, True])
def test_a_target_that_is_a_link_is_written_where_it_points_and_stays_a_link(tmp_path: Path, old_files: bool) -> None:
    real = tmp_path / "disk" / "pruned"
    real.mkdir(parents=True)
    if old_files:
        (real / "config.json").write_text("old")
    link = tmp_path / "pruned"
    link.symlink_to(real)
    assert check_save_target(link, overwrite=True) == real
    with atomic_directory(link) as partial:
        (partial / "config.json").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert [path.name for path in real.iterdir()] == ["config.json"] and (real / "config.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk", "pruned"]
    assert [path.name for path in real.parent.iterdir()] == ["pruned"]


def test_a_mount_point_is_refused_before_any_work() -> None:
    """A mount point (a container's output volume, `-v ./out:/out`) cannot be renamed: before, the write failed once
    the model was pruned ("could not be written to /out (Device or resource busy) … HINT: free space or fix the
    permissions")."""
    mount = Path("/proc")
    if not os.path.ismount(mount):
        pytest.skip("no /proc mount point here")
    with pytest.raises(ValueError, match=r"is '/proc', a mount point: .* HINT: save into a folder inside it, e.g. "):
        check_save_target(mount, overwrite=True)


def test_a_target_without_the_free_space_it_needs_is_refused_before_the_write(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "new" / "pruned"
    with pytest.raises(OSError, match=r"takes at least .* GiB there, and the filesystem of .* GiB free; nothing was"):
        check_save_target(target, overwrite=False, least_bytes=free + 2**30)
    assert not (tmp_path / "new").exists()
    assert check_save_target(target, overwrite=False, least_bytes=free // 2) == target


def test_refusals_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    source = tmp_path / "models" / "dense"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    for target in (source, source.parent):
        with pytest.raises(ValueError, match="holds the source model .* HINT: choose another folder"):
            check_save_target(target, overwrite=True, protected=[source])
    with pytest.raises(FileExistsError, match="not empty; nothing was written. HINT: .*--pruning.overwrite true"):
        check_save_target(tmp_path / "models", overwrite=False)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="must be a directory, but .* is a file"):
        check_save_target(a_file, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file, so no folder can be made below it"):
        check_save_target(a_file / "pruned", overwrite=False)
    assert check_save_target(tmp_path / "new" / "pruned", overwrite=False) == tmp_path / "new" / "pruned"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert not list(tmp_path.glob(".ecoflap-write-check-*"))  # and leaves no trace of its probe
    assert (source / "model.safetensors").read_bytes() == b"weights"


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path: Path) -> None:
    """A folder the user cannot write gets a PermissionError naming it. Root ignores mode bits, so as root the check
    runs in a child that util-linux's ``setpriv`` has stripped of the capability to override them."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code = (
        "import sys\n"
        "from ecoflap_pl.export import check_save_target\n"
        "try:\n"
        f"    check_save_target({str(locked / 'pruned')!r}, overwrite=False)\n"
        "except PermissionError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    drop = "--bounding-set=-dac_override,-dac_read_search"
    prefix = ["setpriv", drop.replace("bounding-set", "inh-caps"), drop] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert f"{locked} cannot be written" in result.stdout and "HINT" in result.stdout
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("check", ["save_to", "report_dir"])
def test_a_folder_that_takes_no_new_entry_is_refused_whatever_its_mode_bits_say(check: str) -> None:
    """``/proc`` looks writable to root (``os.access`` says yes) but takes no new folder: the check must find out
    by trying, before pruning, not when the files are written after it."""
    target = "/proc/ecoflap-pruned"
    assert os.geteuid() != 0 or os.access("/proc", os.W_OK)  # mode bits alone would let it through as root
    with pytest.raises(PermissionError, match=rf"`{check}` is '{target}', but /proc cannot be written .*HINT"):
        if check == "save_to":
            check_save_target(target, overwrite=False)
        else:
            check_writable_folder(target, option="report_dir")


def test_a_report_dir_that_is_a_file_or_below_one_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "report"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match=r"`report_dir` must be a directory, but '.*report' is a file. HINT"):
        check_writable_folder(a_file, option="report_dir")
    with pytest.raises(FileExistsError, match="is a file, so no folder can be made below it"):
        check_writable_folder(a_file / "sub", option="report_dir")
    assert check_writable_folder(tmp_path / "new", option="report_dir") == tmp_path / "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"]


HOLDER = """
import sys
from ecoflap_pl.export import atomic_directory
with atomic_directory(sys.argv[1]) as partial:
    (partial / "weights").write_text("the holder's")
    print(partial, flush=True)
    sys.stdin.readline()
"""
"""A write that stops half-way, until a line comes on its stdin."""


def start_holder(target: Path) -> tuple[subprocess.Popen[str], Path]:
    """A child process in the middle of a write of ``target``, and the partial folder it is writing."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def write_now(target: Path, text: str) -> None:
    with atomic_directory(target) as partial:
        (partial / "weights").write_text(text)


def test_a_write_in_progress_is_left_alone_and_finishes(tmp_path: Path) -> None:
    target = tmp_path / "pruned"
    child, partial = start_holder(target)
    try:
        write_now(target, "mine")
        assert (partial / "weights").read_text() == "the holder's"  # the live write kept its folder
        assert (target / "weights").read_text() == "mine"
    finally:
        child.communicate("go on\n", timeout=60)
    assert child.returncode == 0
    assert (target / "weights").read_text() == "the holder's"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


def test_the_leftovers_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "pruned"
    write_now(target, "old")
    child, partial = start_holder(target)
    child.kill()
    child.wait()
    assert partial.is_dir() and len(list(tmp_path.iterdir())) == 3  # target, partial, lock file
    write_now(target, "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]
    assert (target / "weights").read_text() == "new"


def test_leftovers_named_by_a_process_id_now_in_use_by_another_process_are_removed(tmp_path: Path) -> None:
    """After a crash the writer's process id goes to some other process: the id alone must not keep its leftovers."""
    target = tmp_path / "pruned"
    write_now(target, "old")
    other = subprocess.Popen(["sleep", "60"])
    try:
        tag = f"{other.pid}-0badc0de"
        for name in (f".pruned.partial-{other.pid}", f".pruned.partial-{tag}", f".pruned.previous-{tag}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_text("half")
        (tmp_path / f".pruned.writer-{tag}").write_text("")  # its lock file, which nobody holds
        write_now(target, "new")
        assert other.poll() is None  # the process with that id still runs
    finally:
        other.kill()
        other.wait()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]
    assert (target / "weights").read_text() == "new"


def test_the_old_folder_set_aside_by_a_killed_write_is_restored(tmp_path: Path) -> None:
    """The two-rename fallback killed between its renames leaves no target, only the old folder set aside."""
    target = tmp_path / "pruned"
    write_now(target, "old")
    tag = "12345-0badc0de"
    target.rename(tmp_path / f".pruned.previous-{tag}")
    (tmp_path / f".pruned.partial-{tag}").mkdir()
    (tmp_path / f".pruned.writer-{tag}").write_text("")
    with atomic_directory(target) as partial:
        assert (target / "weights").read_text() == "old"  # back in place before the new write starts
        (partial / "weights").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pruned"]


def test_without_file_locks_leftovers_are_kept_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a filesystem that refuses locks (or on Windows) a leftover cannot be judged, so it is kept and named."""
    target = tmp_path / "pruned"
    (tmp_path / ".pruned.partial-7-0badc0de").mkdir()
    (tmp_path / ".pruned.writer-7-0badc0de").write_text("")

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    write_now(target, "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".pruned.partial-7-0badc0de",
        ".pruned.writer-7-0badc0de",
        "pruned",
    ]
    assert "Keeping .pruned.partial-7-0badc0de, .pruned.writer-7-0badc0de in" in caplog.text
    assert "HINT: remove them once no run is writing" in caplog.text
