"""One writer per output folder: ``cola train`` and ``cola sweep`` lock the folder they write.

The lock is a file, ``<folder>/cola.lock``, created atomically (``O_CREAT | O_EXCL``: of two processes
started at the same instant exactly one creates it) and holding its owner: pid, host, the process's
start time, when, and the command. It is removed at the end, on an error and on a signal (the
process unwinds through :meth:`FolderLock.release`). A process that was killed (SIGKILL, out of
memory, a crashed node) leaves it behind: a *stale* lock, whose pid no longer runs on this host (or
runs a newer process: the start time differs). A stale lock is never taken silently:
``take_over=True`` (``--take-over-lock``) takes it over, and so does ``take_stale=True`` (what
``--resume`` asks for: continuing a killed run is what resuming is for) when the lock is *provably*
stale, with one warning line, as PostgreSQL does with a dead postmaster's pid file. A live owner is
never overridden; a lock from another host (or a damaged lock file) cannot be checked from here and
is taken over only with ``take_over``.

While the lock is held the folder is *held* (:func:`cola.io.hold`): a write beneath it refuses to
re-create the folder if it vanishes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from cola import io
from cola.errors import ColaError

log = logging.getLogger(__name__)

LOCK_NAME = "cola.lock"
TAKE_OVER_FLAG = "--take-over-lock"
_GUARD_WAIT = 5.0          #: seconds a take-over waits for another's take-over to finish
_held_tokens: set[str] = set()   #: the locks this process holds now


class LockError(ColaError):
    """The output folder is locked by another process (or by a stale lock not taken over)."""


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: ``/proc/<pid>/stat`` field 22), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    except OSError:
        return False
    return True


@dataclass
class Owner:
    """Who holds a lock."""

    pid: int
    host: str
    started: str | None      #: the process's start time, to tell a recycled pid from its owner
    since: str
    command: str
    token: str

    @classmethod
    def me(cls, command: str) -> "Owner":
        return cls(os.getpid(), socket.gethostname(), _started(os.getpid()),
                   datetime.now().isoformat(timespec="seconds"), command, uuid.uuid4().hex)

    @classmethod
    def read(cls, path: Path) -> "Owner | None":
        """The owner written in ``path``; None when it is missing, empty or not a lock (being written)."""
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool | None:
        """True if it still runs, False if not, None when it is on another host (cannot be told)."""
        if self.host != socket.gethostname():
            return None
        if self.pid == os.getpid():
            return self.token in _held_tokens
        if not _running(self.pid):
            return False
        return self.started is None or _started(self.pid) in (None, self.started)

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on host {self.host}, since {self.since})"


class FolderLock:
    """The lock of an output folder: ``with FolderLock(folder, "cola train"):`` or :meth:`acquire` /
    :meth:`release`.

    Args:
        folder: the output folder (created when missing).
        command: what holds it, for the messages of the processes it turns away.
        take_over: take over a stale lock (its process is gone) or one from another host.
        take_stale: take over a lock that is provably stale (this host, its process gone), with a warning.
    """

    def __init__(self, folder: str | os.PathLike, command: str, take_over: bool = False, take_stale: bool = False):
        self.folder, self.command, self.take_over, self.take_stale = Path(folder), command, take_over, take_stale
        self.path = self.folder / LOCK_NAME
        self.owner: Owner | None = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "FolderLock":
        """Create the lock file, or raise :class:`LockError` saying who holds it."""
        if self.owner is not None:
            return self
        io.make_folder(self.folder, "output folder")
        me = Owner.me(self.command)
        while not self._create(me):
            other = self._owner()
            if other is None and not self.path.exists():
                continue   # released between the two looks: try again
            alive = other.alive() if other is not None else None   # unknown: only with take_over
            provably_stale = alive is False and self.take_stale
            if alive or not (self.take_over or provably_stale):
                raise LockError(self._refusal(other, alive))
            self._take_over(other, me)
            break
        self.owner = me
        _held_tokens.add(me.token)
        io.hold(self.folder)
        return self

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (a no-op otherwise, e.g. the folder is gone)."""
        if self.owner is None:
            return
        token, self.owner = self.owner.token, None
        _held_tokens.discard(token)
        io.release(self.folder)
        current = Owner.read(self.path)
        if current is not None and current.token == token:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as err:   # e.g. the disk turned read-only: the error that brought us here matters more
                log.warning("%s: the lock file could not be removed (%s); it stays as a stale lock: continue with %s",
                            self.folder, err.strerror or err, TAKE_OVER_FLAG)

    # ------------------------------------------------------------------ the lock file
    def _create(self, me: Owner, path: Path | None = None) -> bool:
        """Create ``path`` (the lock) holding ``me``: False if it exists; a machine fault is an OutputError."""
        path = path or self.path
        data = (json.dumps(asdict(me), indent=1) + "\n").encode()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise io.output_error(err, path, "lock file", len(data)) or err from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise io.output_error(err, path, "lock file", len(data)) or err from None
        os.close(fd)
        return True

    def _owner(self) -> Owner | None:
        """The lock's owner; a lock being written right now is read again for a moment."""
        for _ in range(20):
            owner = Owner.read(self.path)
            if owner is not None or not self.path.exists():
                return owner
            time.sleep(0.05)
        return None

    def _take_over(self, stale: Owner | None, me: Owner) -> None:
        """Replace the stale lock by ours; one taker at a time (a guard file beside it, O_EXCL too)."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        deadline = time.monotonic() + _GUARD_WAIT
        while not self._create(me, guard):
            if time.monotonic() > deadline:   # its taker was killed in the middle: it is stale as well
                guard.unlink(missing_ok=True)
            time.sleep(0.05)
        try:
            now = Owner.read(self.path)
            if now is not None and (stale is None or now.token != stale.token):
                raise LockError(self._refusal(now, now.alive()))   # another process took it over first
            self.path.unlink(missing_ok=True)
            if not self._create(me):
                raise LockError(self._refusal(self._owner(), True))
        finally:
            guard.unlink(missing_ok=True)
        log.warning("%s: took over the stale lock of %s", self.folder, stale.describe() if stale else "an unknown owner")

    def _refusal(self, other: Owner | None, alive: bool | None) -> str:
        where = f"{self.folder} is locked ({self.path})"
        if other is None:
            return (f"{where} by an unknown owner (the lock file is empty or damaged). If no cola process writes "
                    f"this folder, delete it or pass {TAKE_OVER_FLAG}")
        if alive:
            return (f"{where} by {other.describe()}, which is still running: two processes cannot write one run. "
                    "Wait for it to finish, or write elsewhere (another --output-dir)")
        if alive is None:
            return (f"{where} by {other.describe()}: another machine, so whether it still runs cannot be told "
                    f"from here. If it does not, pass {TAKE_OVER_FLAG}")
        return (f"{where} by {other.describe()}, which is no longer running (it was killed, or its machine "
                f"crashed): a stale lock. If no other process writes this folder, continue with {TAKE_OVER_FLAG}")


def left_behind(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a lock file of this process that it no longer holds: its release could not
    remove it (a read-only disk), so the next command there needs ``--take-over-lock``."""
    owner = Owner.read(Path(folder) / LOCK_NAME)
    return (owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname()
            and owner.token not in _held_tokens)
