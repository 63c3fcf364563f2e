"""A ``cola train`` run on the tiny OPT of conftest.py, for the crash tests (killed with SIGKILL).

    python reliability_train_script.py SETTINGS_JSON [--resume]

``SETTINGS_JSON``: the :class:`TrainSettings` fields as a JSON object. Prints ``done`` at the end.

With ``COLA_TEST_KILL_AT`` set, the run stops for good at that kill point, writes the file
``COLA_TEST_MARKER`` (atomically) to say it got there, and waits for its SIGKILL:

* ``settings``: right after ``settings.json`` is in place (before zero-shot scoring and training);
* ``writing:N``: while the N-th ``checkpoint.pt`` is being written: its temporary file is complete,
  not yet renamed into place (the marker holds the temporary file's name);
* ``after-checkpoint:N``: right after the N-th ``checkpoint.pt`` is in place.

Every file cola writes goes through ``os.replace`` (atomic writes), which is where it stops.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from conftest import build_tokenizer, tiny_opt  # noqa: E402

from cola.llm.experiment import run_experiment  # noqa: E402
from cola.llm.settings import TrainSettings  # noqa: E402


def stop_at(point: str, marker: str) -> None:
    """Make this process stop at kill point ``point`` (see the module docstring)."""
    kind, _, arg = point.partition(":")
    n = int(arg) if arg else 0
    real_replace = os.replace
    checkpoints = 0

    def hold(what: str) -> None:
        tmp = f"{marker}.tmp"
        Path(tmp).write_text(what)
        real_replace(tmp, marker)
        while True:  # until the SIGKILL
            time.sleep(60)

    def replace(src, dst, *args, **kwargs):
        nonlocal checkpoints
        name = os.path.basename(os.fspath(dst))
        if name == "checkpoint.pt":
            checkpoints += 1
            if kind == "writing" and checkpoints == n:
                hold(f"{point} {os.path.basename(os.fspath(src))}")
        real_replace(src, dst, *args, **kwargs)
        if (kind == "after-checkpoint" and name == "checkpoint.pt" and checkpoints == n
                or kind == "settings" and name == "settings.json"):
            hold(point)

    os.replace = replace


def main() -> None:
    torch.set_num_threads(1)
    if os.environ.get("COLA_TEST_KILL_AT"):
        stop_at(os.environ["COLA_TEST_KILL_AT"], os.environ["COLA_TEST_MARKER"])
    fields = json.loads(sys.argv[1])
    if "--resume" in sys.argv[2:]:
        fields["resume"] = True
    tok = build_tokenizer()
    vocab = len(tok)
    results = run_experiment(TrainSettings(**fields), loader=lambda: (tiny_opt(vocab), tok))
    print("done", results["status"], flush=True)


if __name__ == "__main__":
    main()
