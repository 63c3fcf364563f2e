"""Faults from the machine in ``cola train`` and ``cola sweep`` (issue 19, items 1-3): a full, read-only or
vanished output folder at each write, SIGTERM / SIGINT (one process and under torchrun), the output
folder's lock. Item 4 (knot pre-checks under sharded FSDP factors, full fine-tuning through the
device-side guard) is in tests/test_faults_core.py.

Every command runs through :func:`cola.cli.main` (in this process, or in tests/llm/faults_train_script.py
for the signals and the two-process lock race) on the tiny OPT of conftest.py saved as a model folder.
What the user sees is asserted: the exit code, the one error line on stderr, the files left, and that
``--resume`` once the fault is gone gives the uninterrupted run's numbers (train losses, test metrics,
adapter tensors) to the bit.

Faults are injected at the write primitive every output goes through (``os.replace``: atomic files and
folders) or, where ``mount -t tmpfs`` works (root in a container that allows it), made real: a small tmpfs
that is filled up (``ENOSPC`` in the middle of the write) or remounted read-only (``EROFS``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cola
from cola.llm.lock import LOCK_NAME

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
SCRIPT = HERE / "faults_train_script.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLA_DISABLE_PLUGIN_AUTOLOAD="1", COLA_DIST_BACKEND="gloo",
           TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(HERE.parent.parent))


def train_args(folder: Path, out: Path, *extra: str, plots: bool = False) -> list[str]:
    """``cola train`` of 4 steps, a knot at step 2, a checkpoint after every step but the last, every
    output on (the adapter, the link adapters, the merged model), the plots only with ``plots`` (the tests
    whose fault is at a plot's write: drawing them is most of a tiny run's time)."""
    return ["-q", "train", "--model", str(folder), "--task", "sst2", "--data-dir", str(FIXTURES), "--n-train", "6",
            "--n-val", "2", "--n-test", "4", "--steps", "4", "--batch-size", "2", "--eval-batch-size", "4",
            "--links", "2", "--rank", "2", "--lr", "5e-3", "--threads", "1", "--checkpoint-every", "1",
            "--dropout", "0.1", "--save-merged", "--plots" if plots else "--no-plots", "--output-dir", str(out), *extra]


def cli(*argv: str) -> int:
    from cola.cli import main

    return main(list(argv))


def outcome(out: Path) -> dict:
    """What must not depend on faults and resumes: each run's losses, knots, curve and test metrics, and
    the adapter's tensors."""
    from safetensors.torch import load_file

    results = json.loads((out / "results.json").read_text())
    runs = []
    for r in results["runs"]:
        adapter = load_file(str(out / "runs" / f"{r['method']}-seed{r['seed']}" / "adapter" /
                                "adapter_model.safetensors"))
        runs.append({"key": f"{r['method']}-seed{r['seed']}", "train_loss": r["train_loss"], "knots": r["knots"],
                     "curve": [{k: v for k, v in c["validation"].items() if k != "seconds"} for c in r["curve"]],
                     "test": {k: v for k, v in r["test"].items() if k != "seconds"},
                     "adapter": {k: v.tolist() for k, v in sorted(adapter.items())}})
    return {"status": results["status"], "runs": runs}


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders of atomic writes (``.<name>.*.tmp`` / ``.old``) and the lock, under ``out``."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) or p.name == LOCK_NAME)


def error_lines(err: str, command: str = "train") -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"cola {command}: error:")]


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli(*train_args(tiny_folder, out)) == 0
    return outcome(out)


# ============================================================================ item 1: injected at os.replace

def fail_at(monkeypatch, target: Path, n: int, code: int) -> dict:
    """The ``n``-th ``os.replace`` onto the file or folder ``target`` fails with ``code`` (an OSError, as the
    kernel reports it; its source, the complete temporary file or folder, is what must be cleaned up).
    Returns a dict that records whether it fired."""
    real = os.replace
    state = {"count": 0, "fired": False}

    def replace(src, dst, *args, **kwargs):
        if os.path.abspath(os.fspath(dst)) == str(target):
            state["count"] += 1
            if state["count"] == n and not state["fired"]:
                state["fired"] = True
                raise OSError(code, os.strerror(code), os.fspath(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return state


#: (file or folder written, which write of it, where it is relative to the output folder)
TRAIN_WRITES = [
    ("settings.json", 1, "settings.json"),
    ("zero_shot.json", 1, "zero_shot.json"),
    ("checkpoint.pt", 2, "runs/cola-seed0/checkpoint.pt"),
    ("link-00", 1, "runs/cola-seed0/links/link-00"),
    ("adapter", 1, "runs/cola-seed0/adapter"),
    ("merged", 1, "runs/cola-seed0/merged"),
    ("run.json", 1, "runs/cola-seed0/run.json"),
    ("training_loss.png", 1, "training_loss.png"),
    ("results.md", 1, "results.md"),
    ("results.csv", 1, "results.csv"),
    ("results.json", 1, "results.json"),
]


@pytest.mark.parametrize("name,n,where", TRAIN_WRITES, ids=[w[0] for w in TRAIN_WRITES])
def test_train_full_or_read_only_disk_at_each_write_then_resume(tiny_folder, reference, tmp_path, monkeypatch, capsys,
                                                                name, n, where):
    """Each write of cola train failing for the machine (ENOSPC and EROFS alternate over the writes): exit 2,
    one error line naming what and where (and the space where it is about space), no temporary file, the
    lock released, the previous checkpoint intact; --resume (or, before settings.json, the same command)
    once the disk is fixed gives the uninterrupted run's numbers."""
    code = errno.ENOSPC if TRAIN_WRITES.index((name, n, where)) % 2 == 0 else errno.EROFS
    out = tmp_path / "run"
    args = train_args(tiny_folder, out, plots=name.endswith(".png"))
    fired = fail_at(monkeypatch, out / where, n, code)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert fired["fired"]
    (line,) = error_lines(err)
    reason = "no space left on device" if code == errno.ENOSPC else "read-only file system"
    assert f"{out / where}: {reason}" in line and "nothing half-written is left" in line, line
    if code == errno.ENOSPC:
        assert re.search(r"\(it needs [^;]+; [\d.]+ [KMG]?i?B free there\)", line), line
    assert leftovers(out) == [], leftovers(out)
    if name == "checkpoint.pt":   # the first one, whole
        assert cola.load_checkpoint(out / where)["chain"]["step"] == 1
    if name == "settings.json":   # nothing to resume: the same command again
        assert line.endswith("then run the command again"), line
        assert cli(*args) == 0
    else:
        assert line.endswith(f"then continue with: cola train --resume {out}"), line
        assert cli("-q", "train", "--resume", str(out)) == 0
    capsys.readouterr()
    assert outcome(out) == reference
    assert leftovers(out) == []


def test_train_output_folder_deleted_mid_run_is_reported_not_re_created(tiny_folder, tmp_path, monkeypatch, capsys):
    """The output folder deleted while the run trains: the next write says so (the folder is not created
    afresh, which would leave a run without its settings), exit 2."""
    from cola.llm import loop

    out = tmp_path / "run"
    accumulate = loop.Training.accumulate

    def deleting(self, *args, **kwargs):
        if self.steps_taken + 1 == 2:
            shutil.rmtree(out)
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(loop.Training, "accumulate", deleting)
    assert cli(*train_args(tiny_folder, out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"the output folder {out} is gone (deleted, moved or unmounted while the run was writing it)" in line
    assert "runs/cola-seed0" in line and not out.exists()


def test_train_output_folder_unmounted_then_back_resumes(tiny_folder, reference, tmp_path, monkeypatch, capsys):
    """The output folder moved away (an unmounted disk) at step 3, then back: the write after step 3 fails
    with the folder named; the lock inside it is then a stale one, reported on --resume and taken over
    with --take-over-lock; the run then ends as the uninterrupted one."""
    from cola.llm import loop

    out, away = tmp_path / "run", tmp_path / "away"
    accumulate = loop.Training.accumulate

    def moving(self, *args, **kwargs):
        if self.steps_taken + 1 == 3:
            os.rename(out, away)
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(loop.Training, "accumulate", moving)
    assert cli(*train_args(tiny_folder, out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    monkeypatch.undo()
    assert f"the output folder {out} is gone" in line and not out.exists()
    os.rename(away, out)
    assert cola.load_checkpoint(out / "runs/cola-seed0/checkpoint.pt")["chain"]["step"] == 2
    # the lock the failed process left is provably stale (this host, not held): --resume alone takes it over
    assert cli("-q", "train", "--resume", str(out)) == 0
    capsys.readouterr()
    assert outcome(out) == reference and leftovers(out) == []


# ============================================================================ item 1: a real small disk (tmpfs)

class Disk:
    """A tmpfs mounted at ``path``: :meth:`fill` takes all its free space, :meth:`read_only` remounts it
    read-only; :meth:`fix` undoes either."""

    def __init__(self, path: Path, size: str = "16m"):
        self.path = path
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        self.mounted = proc.returncode == 0
        self.why = proc.stderr.strip()
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 20, 1 << 12, 1):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
        assert shutil.disk_usage(self.path).free == 0

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def fix(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / "disk")
    if not d.mounted:
        pytest.skip(f"mount -t tmpfs is not allowed here ({d.why})")
    yield d
    d.unmount()


def fault_when_written(monkeypatch, name: str, n: int, fault) -> dict:
    """Call ``fault()`` (fill the disk, make it read-only) right before the ``n``-th atomic write of a file
    or folder called ``name`` creates its temporary file: the write itself then meets the real fault."""
    import tempfile

    state = {"count": 0, "fired": False}
    for maker in ("mkstemp", "mkdtemp"):
        real = getattr(tempfile, maker)

        def make(*args, _real=real, **kwargs):
            if kwargs.get("prefix") == f".{name}." and kwargs.get("suffix") == ".tmp":
                state["count"] += 1
                if state["count"] == n and not state["fired"]:
                    state["fired"] = True
                    fault()
            return _real(*args, **kwargs)

        monkeypatch.setattr(tempfile, maker, make)
    return state


REAL_FAULTS = [
    ("checkpoint.pt", 2, "runs/cola-seed0/checkpoint.pt", "full"),
    ("checkpoint.pt", 3, "runs/cola-seed0/checkpoint.pt", "read-only"),
    ("adapter", 1, "runs/cola-seed0/adapter", "full"),
    ("merged", 1, "runs/cola-seed0/merged", "full"),
    ("training_loss.png", 1, "training_loss.png", "full"),
    ("results.json", 1, "results.json", "full"),
    ("results.json", 1, "results.json", "read-only"),
]


@pytest.mark.parametrize("name,n,where,kind", REAL_FAULTS, ids=[f"{w[0]}-{w[3]}" for w in REAL_FAULTS])
def test_train_on_a_real_full_or_read_only_disk(tiny_folder, reference, disk, monkeypatch, capsys, name, n, where, kind):
    """The output folder on a small tmpfs that fills up (the write fails half-way: torch's zip writer,
    safetensors and matplotlib each report it their way) or turns read-only just before a write."""
    out = disk.path / "run"
    fired = fault_when_written(monkeypatch, name, n, disk.fill if kind == "full" else disk.read_only)
    assert cli(*train_args(tiny_folder, out, plots=name.endswith(".png"))) == 2
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert fired["fired"]
    (line,) = error_lines(err)
    reason = "no space left on device" if kind == "full" else "read-only file system"
    assert f"{out / where}: {reason}" in line and "nothing half-written is left" in line, line
    if kind == "full":   # the space a JSON file needs is known; a checkpoint's is about the previous one's
        needs = (r"it needs [\d.]+ K?i?B; " if name.endswith(".json") else
                 r"it needs about [\d.]+ [KM]iB, the size of the one it replaces; " if n > 1 else "")
        assert re.search(rf"\({needs}0 B free there\)", line), line
    disk.fix()
    assert [p for p in leftovers(out) if p != LOCK_NAME] == []
    if name == "checkpoint.pt":
        assert cola.load_checkpoint(out / where)["chain"]["step"] == n - 1
    resume = ["-q", "train", "--resume", str(out)]   # a lock the read-only disk kept is stale: --resume takes it
    if LOCK_NAME in leftovers(out):   # a read-only disk kept the lock file: the message said so
        assert "--take-over-lock" in line, line
    else:
        assert line.endswith(f"then continue with: cola train --resume {out}"), line
    assert cli(*resume) == 0
    capsys.readouterr()
    assert outcome(out) == reference and leftovers(out) == []


# ============================================================================ item 1: cola sweep

def sweep_args(folder: Path, out: Path, plots: bool = False) -> list[str]:
    """``cola sweep`` of two cells (links 1 and 2), one seed, 4 steps each, its plots only with ``plots``."""
    return ["-q", "sweep", "--model", str(folder), "--task", "sst2", "--data-dir", str(FIXTURES), "--n-train", "6",
            "--n-val", "2", "--n-test", "4", "--steps", "4", "--batch-size", "2", "--eval-batch-size", "4", "--links",
            "1", "2", "--seeds", "0", "--rank", "2", "--lr", "5e-3", "--threads", "1",
            *([] if plots else ["--no-plots"]), "--output-dir", str(out)]


def sweep_outcome(out: Path) -> dict:
    """A sweep's numbers: each cell's score, curve and losses, and each run's outcome."""
    results = json.loads((out / "results.json").read_text())
    cells = [{k: c[k] for k in ("label", "scores", "validation_per_link", "train_loss_mean")} for c in results["cells"]]
    runs = {}
    for path in sorted((out / "runs").glob("*/seed*/results.json")):
        run = json.loads(path.read_text())["runs"][0]
        runs[str(path.parent.relative_to(out))] = (run["train_loss"], {k: v for k, v in run["test"].items()
                                                                       if k != "seconds"})
    return {"status": results["status"], "finished": results["runs_finished"], "cells": cells, "runs": runs}


@pytest.fixture(scope="module")
def sweep_reference(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-reference") / "sweep"
    assert cli(*sweep_args(tiny_folder, out)) == 0
    return sweep_outcome(out)


SWEEP_WRITES = ["sweep.json", "results.md", "results.csv", "results.json", "loss_curves.png", "accuracy_vs_links.png"]


@pytest.mark.parametrize("name", SWEEP_WRITES)
def test_sweep_full_or_read_only_disk_at_each_write_then_resume(tiny_folder, sweep_reference, tmp_path, monkeypatch,
                                                                capsys, name):
    """Each write of the sweep's own files failing for the machine: exit 2, one error line, nothing left
    half-written, the lock released, and --resume (or, before sweep.json, the command again) ends as the
    uninterrupted sweep."""
    code = errno.ENOSPC if SWEEP_WRITES.index(name) % 2 == 0 else errno.EROFS
    out = tmp_path / "sweep"
    args = sweep_args(tiny_folder, out, plots=name.endswith(".png"))
    fired = fail_at(monkeypatch, out / name, 1, code)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert fired["fired"]
    (line,) = error_lines(err, "sweep")
    reason = "no space left on device" if code == errno.ENOSPC else "read-only file system"
    assert f"{out / name}: {reason}" in line and "nothing half-written is left" in line, line
    assert leftovers(out) == [], leftovers(out)
    if name == "sweep.json":
        assert line.endswith("then run it again"), line
        assert cli(*args) == 0
    else:
        assert line.endswith(f"then continue with: cola sweep --resume {out}"), line
        assert cli("-q", "sweep", "--resume", str(out)) == 0
    capsys.readouterr()
    assert sweep_outcome(out) == sweep_reference and leftovers(out) == []


def test_sweep_run_checkpoint_on_a_full_disk_stops_the_sweep_then_resume(tiny_folder, sweep_reference, tmp_path,
                                                                         monkeypatch, capsys):
    """A full disk inside one of the sweep's runs (its checkpoint) is no failure of that run: the sweep
    stops with the disk's error (the other runs are not tried on a full disk), and --resume finishes it."""
    out = tmp_path / "sweep"
    real = os.replace
    fired = []

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == "checkpoint.pt" and not fired:
            fired.append(dst)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert cli(*sweep_args(tiny_folder, out)) == 2
    monkeypatch.undo()
    (line,) = error_lines(capsys.readouterr().err, "sweep")
    assert f"{fired[0]}: no space left on device" in line and line.endswith(f"cola sweep --resume {out}"), line
    assert leftovers(out) == [] and not (out / "results.json").exists()
    assert cli("-q", "sweep", "--resume", str(out)) == 0
    capsys.readouterr()
    assert sweep_outcome(out) == sweep_reference


# ============================================================================ item 3: the output folder's lock

def plant_lock(folder: Path, pid: int, command: str = "cola train") -> dict:
    """A lock file in ``folder`` as process ``pid`` of this host would have written it."""
    from dataclasses import asdict

    from cola.llm import lock

    folder.mkdir(parents=True, exist_ok=True)
    owner = asdict(lock.Owner(pid, socket.gethostname(), lock._started(pid), "2026-01-01T00:00:00", command, "t" * 32))
    (folder / LOCK_NAME).write_text(json.dumps(owner))
    return owner


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_two_processes_on_one_folder_exactly_one_runs(tiny_folder, reference, tmp_path):
    """Two cola train started together on one --output-dir: one runs to the end; the other stops at once,
    naming the first one's pid and host; the lock file is gone at the end."""
    out = tmp_path / "run"
    env = {**ENV, "COLA_TEST_HOLD_LOCK": "3"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *train_args(tiny_folder, out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    finished = []
    try:
        while len(finished) < 2:
            for p in procs:
                if p not in finished and p.poll() is not None:
                    finished.append(p)
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = {p.pid: p.communicate() for p in procs}
    loser, winner = finished
    assert (winner.returncode, loser.returncode) == (0, 2), outs
    (line,) = error_lines(outs[loser.pid][1])
    assert (f"{out} is locked ({out / LOCK_NAME}) by cola train (pid {winner.pid} on host {socket.gethostname()}, "
            f"since ") in line and "which is still running: two processes cannot write one run" in line, line
    assert not (out / LOCK_NAME).exists() and outcome(out) == reference


def test_the_lock_file_is_created_atomically(tmp_path):
    """Eight processes take the lock of one folder at the same instant: exactly one gets it (O_EXCL)."""
    import multiprocessing as mp

    from cola.llm.lock import FolderLock, LockError

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(8)

    def take(i: int):
        barrier.wait()
        try:
            FolderLock(tmp_path / "run", "racer").acquire()
            result = ("got", os.getpid())
        except LockError as err:
            result = ("refused", str(err))
        (tmp_path / f"racer{i}.json").write_text(json.dumps(result))
        os._exit(0)   # without releasing: the winner's lock file stays for the check below

    procs = [ctx.Process(target=take, args=(i,)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = [json.loads((tmp_path / f"racer{i}.json").read_text()) for i in range(8)]
    winners = [pid for kind, pid in got if kind == "got"]
    assert len(winners) == 1, got
    owner = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert owner["pid"] == winners[0] and owner["command"] == "racer"
    assert all(f"pid {winners[0]} on host" in text for kind, text in got if kind == "refused")


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_stale_lock_is_reported_then_taken_over(tiny_folder, tmp_path, dead_pid, capsys, command):
    """A lock left by a process that no longer runs: reported (pid, host, the flag), nothing written;
    --take-over-lock takes it over, the command runs, the lock is gone at the end."""
    out = tmp_path / "out"
    planted = plant_lock(out, dead_pid, f"cola {command}")
    args = (train_args if command == "train" else sweep_args)(tiny_folder, out)
    assert cli(*args) == 2
    (line,) = error_lines(capsys.readouterr().err, command)
    assert f"by cola {command} (pid {dead_pid} on host {socket.gethostname()}" in line, line
    assert "which is no longer running (it was killed, or its machine crashed): a stale lock" in line
    assert line.endswith("continue with --take-over-lock"), line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME] and json.loads((out / LOCK_NAME).read_text()) == planted
    assert cli(*args, "--take-over-lock") == 0
    capsys.readouterr()
    assert not (out / LOCK_NAME).exists() and (out / "results.json").is_file()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_live_owner_is_never_overridden(tiny_folder, tmp_path, live_pid, capsys, command):
    out = tmp_path / "out"
    planted = plant_lock(out, live_pid, f"cola {command}")
    args = (train_args if command == "train" else sweep_args)(tiny_folder, out)
    assert cli(*args, "--take-over-lock") == 2
    (line,) = error_lines(capsys.readouterr().err, command)
    assert f"(pid {live_pid} on host {socket.gethostname()}" in line and "which is still running" in line, line
    assert json.loads((out / LOCK_NAME).read_text()) == planted and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_resume_takes_over_a_provably_stale_lock_with_one_warning_and_nothing_else(tmp_path, dead_pid, live_pid,
                                                                                    caplog):
    """``--resume`` (``take_stale``) takes over the lock of a process of this host that no longer runs, with one
    warning line; a live owner is still refused, and a lock from another host still needs --take-over-lock."""
    from cola.llm.lock import FolderLock, LockError

    plant_lock(tmp_path, dead_pid)
    with caplog.at_level("WARNING", logger="cola.llm.lock"):
        with FolderLock(tmp_path, "cola train", take_stale=True):
            pass
    assert [r.getMessage() for r in caplog.records if "took over the stale lock" in r.getMessage()] and \
        f"pid {dead_pid}" in caplog.text
    plant_lock(tmp_path, live_pid)
    with pytest.raises(LockError, match="which is still running"):
        FolderLock(tmp_path, "cola train", take_stale=True).acquire()
    owner = plant_lock(tmp_path, dead_pid)
    owner["host"] = "another-host"
    (tmp_path / LOCK_NAME).write_text(json.dumps(owner))
    with pytest.raises(LockError, match="another machine"):
        FolderLock(tmp_path, "cola train", take_stale=True).acquire()
    (tmp_path / LOCK_NAME).write_text("")   # damaged: cannot be proved stale either
    with pytest.raises(LockError, match="unknown owner"):
        FolderLock(tmp_path, "cola train", take_stale=True).acquire()


def test_a_recycled_pid_is_a_stale_lock(tmp_path, live_pid):
    """The pid runs, but a newer process (another start time) than the one that wrote the lock."""
    from cola.llm.lock import FolderLock, LockError

    owner = plant_lock(tmp_path, live_pid)
    owner["started"] = str(int(owner["started"]) - 1)
    (tmp_path / LOCK_NAME).write_text(json.dumps(owner))
    with pytest.raises(LockError, match="no longer running"):
        FolderLock(tmp_path, "cola train").acquire()
    with FolderLock(tmp_path, "cola train", take_over=True) as held:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid() == held.owner.pid
    assert not (tmp_path / LOCK_NAME).exists()


# ============================================================================ item 2: SIGTERM / SIGINT

def launch(args: list[str], signals: list[dict] | None = None, report: Path | None = None) -> subprocess.Popen:
    env = dict(ENV)
    if signals:
        env["COLA_TEST_SIGNALS"] = json.dumps(signals)
    if report:
        env["COLA_TEST_REPORT"] = str(report)
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpoint_step(out: Path) -> int | None:
    path = out / "runs/cola-seed0/checkpoint.pt"
    return cola.load_checkpoint(path)["chain"]["step"] if path.is_file() else None


def assert_stopped(proc, err: str, out: Path, sig: int, step: int | None) -> None:
    """Exit 128 + signal, the stop and the exact command to continue on stderr, the checkpoint of that step,
    no lock, no temporary file."""
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(sig).name
    if step is not None:
        ckpt = out / "runs/cola-seed0/checkpoint.pt"
        assert f"cola-seed0: stopped by {name} after step {step} of 4; checkpoint {ckpt}" in err, err[-3000:]
        assert checkpoint_step(out) == step
    assert err.rstrip().endswith(f"continue with: cola train --resume {out}"), err[-3000:]
    assert leftovers(out) == [], leftovers(out)


def resumed_outcome(out: Path, capsys) -> dict:
    assert cli("-q", "train", "--resume", str(out)) == 0
    capsys.readouterr()
    return outcome(out)


def test_sigterm_and_sigint_at_random_steps_and_in_a_knot_then_resume(tiny_folder, reference, tmp_path, capsys):
    """A first signal finishes the step (a knot's merge and evaluation too), writes its checkpoint, prints
    how to continue and exits 128 + signal; --resume then gives the uninterrupted run, to the bit. Two
    launches, both signals, both places (SIGTERM at a step: the torchrun test below, and the second-signal test)."""
    rng = random.Random(23)   # step 3: after the knot
    points = [({"at": "step", "n": rng.randint(1, 4), "sig": "SIGINT"}, signal.SIGINT, None),
              ({"at": "knot", "n": 1}, signal.SIGTERM, 2)]   # the knot at step 2, signalled in cola_before_merge
    tried = []
    for i, (point, sig, step) in enumerate(points):
        out = tmp_path / f"run{i}"
        proc = launch(train_args(tiny_folder, out), [point])
        _, err = proc.communicate(timeout=180)
        assert_stopped(proc, err, out, sig, step if step is not None else point["n"])
        assert resumed_outcome(out, capsys) == reference
        tried.append((point, proc.returncode))
    print(f"\nsignals tried (all resumed identically): {tried}")


def test_a_second_signal_stops_at_once(tiny_folder, reference, tmp_path, capsys):
    """The second SIGTERM arrives while the checkpoint of the graceful stop is being written: the process
    stops at once (that temporary file removed, the previous checkpoint kept), exit 143 and how to continue;
    --resume from the previous checkpoint gives the uninterrupted run."""
    out = tmp_path / "run"
    proc = launch(train_args(tiny_folder, out), [{"at": "step", "n": 2}, {"at": "checkpoint", "n": 2}])
    _, err = proc.communicate(timeout=180)
    assert_stopped(proc, err, out, signal.SIGTERM, None)
    assert "interrupted (second SIGTERM: stopped at once): the last checkpoint is where it continues from" in err, err
    assert checkpoint_step(out) == 1
    assert resumed_outcome(out, capsys) == reference


@pytest.mark.slow   # a random moment: a few seconds more, and some draws land after the last step
def test_sigterm_from_outside_at_a_random_moment(tiny_folder, reference, tmp_path, capsys):
    """SIGTERM sent by another process at a random moment of the training: a clean stop with its checkpoint
    (or, after the last step, the run finishing its outputs), and --resume gives the uninterrupted run."""
    out = tmp_path / "run"
    proc = launch(train_args(tiny_folder, out))
    ckpt = out / "runs/cola-seed0/checkpoint.pt"
    while not ckpt.is_file() and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(random.Random(7).uniform(0, 0.2))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    if proc.returncode == 0:   # it had finished its last step: it completes (no checkpoint left to resume)
        assert outcome(out) == reference
        return
    assert_stopped(proc, err, out, signal.SIGTERM, None)
    assert re.search(r"stopped by SIGTERM (after step \d of 4|before it started)", err), err[-3000:]
    assert resumed_outcome(out, capsys) == reference


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank_after_the_same_step(tiny_folder, tmp_path, capsys):
    """torchrun, 2 ranks (gloo): SIGTERM to rank 1's process during step 3. Both ranks finish step 3 (the
    flag travels with the step's loss all-reduce), rank 0 writes the checkpoint of step 3 and prints how to
    continue (once), every rank exits 143. Resumed here on one rank, the run matches an uninterrupted
    one-rank run (float rounding of 2 x 1 vs 1 x 2 examples)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out, ref_out, report = tmp_path / "run", tmp_path / "ref", tmp_path / "report"
    no_dropout = ("--dropout", "0")   # dropout masks differ with the number of ranks
    env = {**ENV, "COLA_TEST_SIGNALS": json.dumps([{"at": "step", "n": 3, "rank": 1}]), "COLA_TEST_REPORT": str(report)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           *train_args(tiny_folder, out, *no_dropout)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    ranks = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(2)]
    assert [r["rc"] for r in ranks] == [143, 143], proc.stderr[-6000:]
    assert [r["steps"] for r in ranks] == [3, 3]   # no rank started step 4
    assert proc.returncode != 0   # torchrun reports its workers' exit code
    assert proc.stderr.count(f"continue with: cola train --resume {out}") == 1, proc.stderr[-6000:]
    assert "cola-seed0: stopped by SIGTERM after step 3 of 4" in proc.stderr
    assert checkpoint_step(out) == 3 and leftovers(out) == []
    resumed = resumed_outcome(out, capsys)
    assert cli(*train_args(tiny_folder, ref_out, *no_dropout)) == 0
    capsys.readouterr()
    ref = outcome(ref_out)
    (a,), (b,) = resumed["runs"], ref["runs"]
    assert a["knots"] == b["knots"] == [2]
    assert max(abs(x - y) for x, y in zip(a["train_loss"], b["train_loss"])) < 1e-4
    assert max(abs(x - y) for k in a["adapter"] for x, y in zip(torch.tensor(a["adapter"][k]).flatten().tolist(),
                                                                 torch.tensor(b["adapter"][k]).flatten().tolist())) < 1e-4
    assert a["test"]["accuracy"] == b["test"]["accuracy"]


def test_a_sweep_resumed_after_a_kill_takes_over_its_runs_stale_locks(tiny_folder, sweep_reference, tmp_path,
                                                                     dead_pid, live_pid, capsys):
    """A sweep killed with one of its runs leaves that run's lock behind: `cola sweep --resume` (which holds the
    sweep folder's lock) takes it over and finishes the run, without --take-over-lock; a live owner of a run
    folder is still never overridden (that run fails, the sweep reports it)."""
    out = tmp_path / "sweep"
    assert cli(*sweep_args(tiny_folder, out)) == 0
    first, second = sorted((out / "runs").glob("*/seed0"))
    for folder, pid in ((first, dead_pid), (second, live_pid)):
        shutil.rmtree(folder)
        plant_lock(folder, pid)
    assert cli("-q", "sweep", "--resume", str(out)) == 1   # 1: a run failed (the one a live process holds)
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert (first / "results.json").is_file() and not (first / LOCK_NAME).exists()
    assert (second / LOCK_NAME).exists() and not (second / "results.json").exists()
    (failure,) = results["failures"]
    assert failure["key"] == second.parent.name and "which is still running" in failure["error"], failure
