"""``cola train`` when things go wrong: non-finite steps, crashes (SIGKILL), damaged checkpoints.

Tiny OPT (tests/llm/conftest.py) on the fixture files. The crash test runs the training in a
subprocess (tests/llm/reliability_train_script.py), kills it with SIGKILL at several points
(before training, while a checkpoint file is being written, right after a knot's checkpoint,
after random delays), resumes each to completion and compares with an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cola
from cola.errors import ColaError
from cola.llm import objective
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings

FIXTURES = Path(__file__).parent / "fixtures"
SCRIPT = Path(__file__).parent / "reliability_train_script.py"


@pytest.fixture
def loader(tok, make_model):
    return lambda: (make_model("opt"), tok)


def tiny_fields(out: Path, **changes) -> dict:
    base = dict(model="tiny", task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4, steps=6,
                batch_size=2, eval_batch_size=4, links=3, rank=2, lr=5e-3, full_lr=1e-3, plots=False,
                save_adapter=False, save_links=False, output_dir=str(out), log_every=1)
    base.update(changes)
    return base


def nan_after(monkeypatch, good: int, bad: int | None = None) -> None:
    """From the ``good``-th call on (for ``bad`` calls, or for ever), the training loss is NaN."""
    real = objective.training_loss
    calls = [0]

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] > good and (bad is None or calls[0] <= good + bad):
            return value * float("nan")  # NaN loss and NaN gradients
        return value

    monkeypatch.setattr(objective, "training_loss", loss)


# ------------------------------------------------------------------------------ non-finite steps

@pytest.mark.parametrize("method", ["cola", "full"])
def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, loader, monkeypatch, method):
    """Micro-batches 3 and 4 are NaN: those two steps leave the weights alone and are counted; they
    still count as steps of the schedule (recorded with a loss of None)."""
    nan_after(monkeypatch, good=2, bad=2)
    results = run_experiment(TrainSettings(**tiny_fields(tmp_path / "run", method=method)), loader=loader)
    (run,) = results["runs"]
    assert results["status"] == "complete" and run["nonfinite_steps"] == 2
    assert len(run["train_loss"]) == 6 and [i for i, v in enumerate(run["train_loss"]) if v is None] == [2, 3]
    assert all(math.isfinite(v) for v in run["train_loss"] if v is not None)
    assert run["position"] == 6 and run["nonfinite_in_row"] == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["nonfinite_steps"] == {f"{method}-seed0": 2}
    assert saved["runs"][0]["train_loss"][2:4] == [None, None]  # strict JSON: no NaN in the file


HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


@pytest.mark.parametrize("method", ["lora", "cola"])
def test_the_training_loop_reads_the_device_only_when_it_reports(tmp_path, loader, monkeypatch, method):
    """Issue 14: cola train's own loop keeps each step's loss and skip flag on the device and reads
    the pending steps back at once where it reports them (every log_every steps, at a knot, at the
    end): no host read inside an ordinary step, from any of cola's modules."""
    from cola.llm import loop

    in_step, reads, flushed = [None], [], []   # in_step: the step being taken (None: outside a step)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_globals.get("__name__", "")
            # iterate_batches draws each epoch's data order with a host generator: host data, not a device read
            if in_step[0] and caller.startswith("cola") and frame.f_code.co_name != "iterate_batches":
                reads.append((in_step[0], _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("accumulate", "take_step"):
        original = getattr(loop.Training, name)

        def inside(self, *args, _original=original, **kwargs):
            in_step[0] = self.steps_taken + 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                in_step[0] = None

        monkeypatch.setattr(loop.Training, name, inside)
    flush = loop.Training.flush
    monkeypatch.setattr(loop.Training, "flush",
                        lambda self: (flushed.append(self.steps_taken) if self.pending else None, flush(self)))
    results = run_experiment(TrainSettings(**tiny_fields(tmp_path / "run", method=method, steps=12, log_every=5,
                                                         checkpoint_every=0)), loader=loader)
    monkeypatch.undo()
    (run,) = results["runs"]
    knots = {r["step"] for r in run["knot_reports"]}
    assert knots == ({4, 8} if method == "cola" else set())
    assert flushed == sorted({5, 10, 12} | knots)
    assert len(run["train_loss"]) == 12 and all(math.isfinite(v) for v in run["train_loss"])
    # a knot may read (its finiteness checks, before anything is written); an ordinary step does not
    assert {step for step, _ in reads} == knots, reads


@pytest.mark.parametrize("method", ["cola", "full"])
def test_too_many_nonfinite_steps_in_a_row_checkpoint_and_stop_then_resume(tmp_path, loader, monkeypatch, method):
    out = tmp_path / "run"
    settings = TrainSettings(**tiny_fields(out, method=method, steps=9, max_nonfinite_in_row=3, checkpoint_every=0))
    nan_after(monkeypatch, good=3)  # steps 1-3 fine, then NaN for ever: steps 4, 5, 6 skipped, then the stop
    with pytest.raises(ColaError) as info:
        run_experiment(settings, loader=loader)
    ckpt = out / "runs" / f"{method}-seed0" / "checkpoint.pt"
    text = str(info.value)
    assert "3 steps in a row with a non-finite loss" in text and "stopped after step 6, the last good one was 3" in text
    assert str(ckpt) in text and "--resume" in text
    state = cola.load_checkpoint(ckpt)
    assert state["record"]["train_loss"][3:] == [None, None, None] and state["record"]["position"] == 6
    assert state["record"]["nonfinite_steps"] == 3
    if method == "cola":
        assert state["chain"]["step"] == 6 and state["chain"]["nonfinite_steps"] == 3

    monkeypatch.undo()  # the cause is fixed: resume from the checkpoint
    resumed = run_experiment(settings.replace(resume=True), loader=loader)
    (run,) = resumed["runs"]
    assert resumed["status"] == "complete" and len(run["train_loss"]) == 9
    assert run["nonfinite_steps"] == 3 and resumed["nonfinite_steps"] == {f"{method}-seed0": 3}
    assert run["position"] == 9  # 3 good, 3 skipped, 3 more good: the data order just continued
    # the expected outcome: the run that skipped the same three steps without stopping, to the bit
    nan_after(monkeypatch, good=3, bad=3)
    reference = run_experiment(TrainSettings(**tiny_fields(tmp_path / "reference", method=method, steps=9,
                                                           max_nonfinite_in_row=4, checkpoint_every=0)),
                               loader=loader)
    monkeypatch.undo()
    (ref,) = reference["runs"]
    assert reference["status"] == "complete" and ref["nonfinite_steps"] == 3 and ref["position"] == 9
    assert run["train_loss"] == ref["train_loss"]
    assert run["test"] == {**ref["test"], "seconds": run["test"]["seconds"]}

    def timeless(curve):
        return [{k: v for k, v in c["validation"].items() if k != "seconds"} for c in curve]

    assert timeless(run["curve"]) == timeless(ref["curve"])


def test_max_nonfinite_in_row_is_checked():
    with pytest.raises(cola.ConfigError, match="max_nonfinite_in_row=0: must be >= 1"):
        TrainSettings(max_nonfinite_in_row=0)


# ------------------------------------------------------------------------------ damaged checkpoints

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "truncated-trailer":
        path.write_bytes(data[:-5])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bit-flip":
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "plain-torch-save":  # a valid torch file, but not written by cola.save_checkpoint
        torch.save({"hello": 1}, path)


BAD_CHECKPOINTS = ("truncated-half", "truncated-trailer", "empty", "bit-flip", "garbage", "plain-torch-save")


def test_resume_refuses_a_damaged_checkpoint(tmp_path, loader):
    out = tmp_path / "run"
    settings = TrainSettings(**tiny_fields(out, stop_after=3))
    assert run_experiment(settings, loader=loader)["status"] == "stopped"
    ckpt = out / "runs" / "cola-seed0" / "checkpoint.pt"
    good = ckpt.read_bytes()
    tried = 0
    for how in BAD_CHECKPOINTS:
        ckpt.write_bytes(good)
        _damage(ckpt, how)
        with pytest.raises(ColaError, match=r"cola-seed0: cannot resume: checkpoint .*checkpoint\.pt.* "
                                            r"(truncated|corrupted|checksum)") as info:
            run_experiment(settings.replace(stop_after=None, resume=True), loader=loader)
        assert "Move the file away to restart this run" in str(info.value), how
        tried += 1
    # another run's checkpoint, intact: refused too
    ckpt.write_bytes(good)
    state = cola.load_checkpoint(ckpt)
    state["key"] = "lora-seed0"
    cola.save_checkpoint(ckpt, state)
    with pytest.raises(ColaError, match="not one this version of cola train wrote"):
        run_experiment(settings.replace(stop_after=None, resume=True), loader=loader)
    tried += 1
    print(f"\ndamaged checkpoints tried: {tried}, all refused")
    ckpt.write_bytes(good)  # the intact one resumes
    assert run_experiment(settings.replace(stop_after=None, resume=True), loader=loader)["status"] == "complete"


# ------------------------------------------------------------------------------ SIGKILL

KILL_FIELDS = dict(steps=20, links=4, checkpoint_every=3, dropout=0.1, keep_checkpoints=True, threads=1)
# knots at 5, 10, 15; checkpoints at 3, 5, 6, 9, 10, 12, 15, 18 and 20 (the last step)


def _wait_for(predicate, proc, timeout: float = 120.0, poll: float = 0.0005) -> bool:
    """Poll until ``predicate()`` or the process exits; True if the predicate came true first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training subprocess")


def _tmp_files(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob(".checkpoint.pt.*.tmp")] if run_dir.is_dir() else []


def _kill_at(out: Path, point: tuple, rng: random.Random, marker: Path) -> dict:
    """Start the training subprocess, SIGKILL it at ``point``; what happened and what it left on disk.

    At a named point the subprocess stops itself there and writes ``marker`` (see
    reliability_train_script.py); a ``delay`` point is a random time after the first checkpoint.
    """
    fields = tiny_fields(out, **KILL_FIELDS)
    run_dir = out / "runs" / "cola-seed0"
    ckpt = run_dir / "checkpoint.pt"
    kind, arg = point
    name = kind if arg is None else f"{kind}:{arg}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kind != "delay":
        env.update(COLA_TEST_KILL_AT=name, COLA_TEST_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(fields)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        if kind == "delay":
            reached = _wait_for(ckpt.is_file, proc)
            if reached:
                time.sleep(rng.uniform(0.0, arg))
        else:
            reached = _wait_for(marker.is_file, proc)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if finished and proc.returncode != 0:
        raise AssertionError(f"training subprocess failed:\n{err.decode()[-3000:]}")
    state = None
    if ckpt.is_file():
        state = cola.load_checkpoint(ckpt)  # a checkpoint that exists is always whole
    return {"point": name, "reached": reached, "killed": not finished,
            "marker": marker.read_text() if marker.is_file() else None,
            "settings_written": (out / "settings.json").is_file(), "tmp_files": _tmp_files(run_dir),
            "stale_lock": (out / "cola.lock").is_file(),   # a killed process cannot remove its lock
            "complete": (out / "results.json").is_file()
                        and json.loads((out / "results.json").read_text()).get("status") == "complete",
            "checkpoint_step": state["chain"]["step"] if state else None}


def _assert_killed_at_its_point(row: dict, checkpoint_steps: list[int]) -> None:
    """What only that kill point leaves on disk: the proof that the kill happened there."""
    kind, _, arg = row["point"].partition(":")
    assert row["reached"], f"kill point {row['point']} was never reached: {row}"
    if kind == "delay":  # a random moment: killed anywhere after the first checkpoint, or finished first
        assert row["checkpoint_step"] in checkpoint_steps or not row["killed"], row
        return
    assert row["killed"] and row["marker"].split()[0] == row["point"], row
    n = int(arg) if arg else 0
    if kind == "settings":  # the run folder started, no step trained
        assert row["settings_written"] and row["checkpoint_step"] is None and not row["tmp_files"], row
    elif kind == "writing":  # the N-th checkpoint's temporary file left behind; the (N-1)-th in place
        assert row["tmp_files"] == [row["marker"].split()[1]], row
        assert row["checkpoint_step"] == (checkpoint_steps[n - 2] if n > 1 else None), row
    else:  # after-checkpoint: the N-th checkpoint in place, no temporary file
        assert not row["tmp_files"] and row["checkpoint_step"] == checkpoint_steps[n - 1], row


def _same_run(a: dict, b: dict, out_a: Path, out_b: Path) -> bool:
    ra, rb = a["runs"][0], b["runs"][0]
    if ra["train_loss"] != rb["train_loss"] or ra["knots"] != rb["knots"]:
        return False
    if {k: v for k, v in ra["test"].items() if k != "seconds"} != {k: v for k, v in rb["test"].items()
                                                                  if k != "seconds"}:
        return False
    if [c["validation"]["accuracy"] for c in ra["curve"]] != [c["validation"]["accuracy"] for c in rb["curve"]]:
        return False
    sa = cola.load_checkpoint(out_a / "runs/cola-seed0/checkpoint.pt")["chain"]
    sb = cola.load_checkpoint(out_b / "runs/cola-seed0/checkpoint.pt")["chain"]
    return sa["step"] == sb["step"] == 20 and all(
        torch.equal(layer[p], sb["layers"][name][p]) for name, layer in sa["layers"].items() for p in ("A", "B", "weight"))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, loader):
    reference_out = tmp_path / "reference"
    reference = run_experiment(TrainSettings(**tiny_fields(reference_out, **KILL_FIELDS)), loader=loader)
    assert reference["status"] == "complete"
    train_seconds = reference["runs"][0]["seconds"]["train"] + reference["runs"][0]["seconds"]["eval"]
    rng = random.Random(20240607)
    points = [("settings", None), ("writing", 1), ("writing", 4), ("after-checkpoint", 2), ("after-checkpoint", 5),
              ("after-checkpoint", 9),   # the last step's checkpoint: killed during the final evaluation
              ("delay", train_seconds), ("delay", train_seconds), ("delay", 2 * train_seconds)]
    # the checkpoints of the uninterrupted run: every checkpoint_every steps, at every knot and the last step
    # (a kill after the last checkpoint, during the final evaluation, leaves that one in place)
    knots, every, steps = reference["runs"][0]["knots"], KILL_FIELDS["checkpoint_every"], KILL_FIELDS["steps"]
    checkpoint_steps = sorted(set(range(every, steps, every)) | set(knots) | {steps})
    assert checkpoint_steps[:5] == [3, 5, 6, 9, 10] and checkpoint_steps[8] == steps
    rows = []
    for i, point in enumerate(points):
        out = tmp_path / f"kill{i}"
        row = _kill_at(out, point, rng, tmp_path / f"kill{i}.reached")
        _assert_killed_at_its_point(row, checkpoint_steps)
        # a killed process leaves its lock, unless a random moment fell after the run had finished and released it
        # (while the interpreter was exiting): then its outputs are complete
        assert row["stale_lock"] == row["killed"] or (row["point"].startswith("delay") and row["complete"]), row
        # the killed process's lock is provably stale (this host, its pid gone): --resume alone takes it over
        resumed = run_experiment(TrainSettings(**tiny_fields(out, **KILL_FIELDS, resume=True)), loader=loader)
        row["identical"] = resumed["status"] == "complete" and _same_run(reference, resumed, reference_out, out)
        rows.append(row)
    killed = [r for r in rows if r["killed"]]
    print(f"\nSIGKILL points tried: {len(rows)}; killed mid-run: {len(killed)}; "
          f"killed mid-checkpoint-write (temp file left): {sum(bool(r['tmp_files']) for r in rows)}; "
          f"resumed identically: {sum(r['identical'] for r in rows)}/{len(rows)}")
    for r in rows:
        print("  ", r)
    assert all(r["identical"] for r in rows), rows
    assert sum(bool(r["tmp_files"]) for r in rows) >= 2  # the two "writing" points
