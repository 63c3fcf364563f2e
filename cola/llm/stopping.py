"""Stopping ``cola train`` and ``cola sweep`` from outside: SIGTERM and SIGINT, the way Slurm,
Kubernetes and Ctrl-C stop a job.

Inside :func:`graceful` the first signal only sets a flag (:func:`requested`: a Python int, free to
read). The training loop reads it after each optimizer step: it finishes that step (a knot and its
evaluation included), writes a checkpoint and raises :class:`SignalStop`, whose message names the
step and the checkpoint; the command line adds the exact command that continues and exits with
128 + the signal's number. Under torchrun every rank stops after the same step: the flags travel
with the step's loss average, an all-reduce the loop makes anyway (:func:`cola.distributed.average_and_any`),
and rank 0 writes. A second signal ends at once: :class:`Interrupted` (a ``KeyboardInterrupt``) is
raised wherever the program is; atomic writes leave no half file behind and the output folder's
lock is released on the way out.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cola.errors import ColaError

log = logging.getLogger(__name__)

#: the signals that stop a run, in the order of the flags that carry them between ranks
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {"depth": 0, "requested": 0, "previous": {}}


class SignalStop(ColaError):
    """A run stopped after an optimizer step because of a signal; its checkpoint is written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupted(KeyboardInterrupt):
    """A second signal: everything stops at once (the last checkpoint is where to continue from)."""

    def __init__(self, signum: int):
        super().__init__(f"second {name(signum)}: stopped at once")
        self.signum = signum


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> int:
    """The number of the signal that asked to stop, 0 when none has."""
    return _state["requested"]


def flags() -> list[bool]:
    """:func:`requested` as one flag per signal of :data:`SIGNALS` (what ranks exchange)."""
    return [requested() == s for s in SIGNALS]


def from_flags(values: Sequence[bool]) -> int:
    """The signal that flags (OR-ed over the ranks) stand for, 0 for none: SIGTERM before SIGINT."""
    return next((s for s, on in zip(SIGNALS, values) if on), 0)


def _handle(signum: int, frame) -> None:
    if _state["requested"]:
        raise Interrupted(signum)
    _state["requested"] = signum
    log.warning("%s received: stopping after the current optimizer step (a checkpoint is written); send it again to "
                "stop at once", name(signum))


@contextmanager
def graceful() -> Iterator[None]:
    """SIGTERM and SIGINT stop after the current step while inside (nested uses share the outermost).

    Outside the main thread (where Python cannot install handlers) signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        _state["requested"] = 0
        _state["previous"] = {s: signal.signal(s, _handle) for s in SIGNALS}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for s, previous in _state["previous"].items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            _state["requested"] = 0
