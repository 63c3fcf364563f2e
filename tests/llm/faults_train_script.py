"""``cola train`` / ``cola sweep`` (:func:`cola.cli.main`) in a process of its own, for the fault tests
(tests/llm/test_faults.py): signals at chosen moments, a lock held for a while.

    python faults_train_script.py CLI_ARGS...          (or under torchrun)

Set in the environment (all optional):

* ``COLA_TEST_SIGNALS``: a JSON list of ``{"at": ..., "n": N, "sig": "SIGTERM", "rank": R}``; this
  process sends itself ``sig`` (a real signal, handled as one from outside) at that moment, only on
  rank ``R`` when given:

  - ``"step"``: while the N-th optimizer step of the run is being computed (its forward pass);
  - ``"knot"``: inside the N-th knot, in the ``cola_before_merge`` hook (before the live link is merged);
  - ``"checkpoint"``: while the N-th ``checkpoint.pt`` is being written (its temporary file is
    complete, not yet renamed into place).

* ``COLA_TEST_HOLD_LOCK``: seconds to wait right after the output folder's lock is taken (so that a
  second process started at the same time finds it held).
* ``COLA_TEST_REPORT``: a JSON file (``.<rank>`` appended) written at the end: the exit code, the
  optimizer steps computed (the last one started) and the knot steps.

Prints nothing itself; the exit code is :func:`cola.cli.main`'s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cola
from cola.llm import loop
from cola.llm.lock import FolderLock

RANK = int(os.environ.get("RANK", "0"))
seen = {"steps": 0, "knots": [], "checkpoints": 0}


def _send(sig: str) -> None:
    os.kill(os.getpid(), getattr(signal, sig))


def _mine(point: dict) -> bool:
    return point.get("rank") is None or point["rank"] == RANK


def install(points: list[dict]) -> None:
    """Send the signals of ``points`` at their moments (see the module docstring)."""
    accumulate = loop.Training.accumulate

    def counted(self, *args, **kwargs):
        seen["steps"] = self.steps_taken + 1
        for p in points:
            if p["at"] == "step" and p["n"] == seen["steps"] and _mine(p):
                _send(p.get("sig", "SIGTERM"))
        return accumulate(self, *args, **kwargs)

    loop.Training.accumulate = counted

    class KnotSignal:
        @cola.hookimpl
        def cola_before_merge(self, chain, link, step):
            seen["knots"].append(step)
            for p in points:
                if p["at"] == "knot" and p["n"] == len(seen["knots"]) and _mine(p):
                    _send(p.get("sig", "SIGTERM"))
                    time.sleep(0.2)   # the knot goes on after the handler ran

    cola.get_plugin_manager().register(KnotSignal(), "faults-knot-signal")
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == "checkpoint.pt":
            seen["checkpoints"] += 1
            for p in points:
                if p["at"] == "checkpoint" and p["n"] == seen["checkpoints"] and _mine(p):
                    _send(p.get("sig", "SIGTERM"))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def hold_lock(seconds: float) -> None:
    acquire = FolderLock.acquire

    def held(self):
        got = acquire(self)
        time.sleep(seconds)
        return got

    FolderLock.acquire = held


def main() -> int:
    import torch

    torch.set_num_threads(1)
    if os.environ.get("COLA_TEST_SIGNALS"):
        install(json.loads(os.environ["COLA_TEST_SIGNALS"]))
    if os.environ.get("COLA_TEST_HOLD_LOCK"):
        hold_lock(float(os.environ["COLA_TEST_HOLD_LOCK"]))
    from cola.cli import main as cli_main

    code = 1
    try:
        code = cli_main(sys.argv[1:])
    finally:
        report = os.environ.get("COLA_TEST_REPORT")
        if report:
            Path(f"{report}.{RANK}").write_text(json.dumps({"rc": code, **seen}))
    return code


if __name__ == "__main__":
    sys.exit(main())
