"""Writing files so that neither a crash nor the machine leaves half of one, and the two formats every report uses.

* :func:`atomic_writer`, :func:`atomic_write` (bytes or text), :func:`write_json`: a temporary file in
  the same folder, flushed and fsynced, then renamed over the target; a crash at any moment leaves
  the old file or the new one. A stray ``.<name>.*.tmp`` may be left by a crash and is harmless.
* :func:`atomic_folder`: a folder (an adapter, a merged model) written in a temporary sibling, then
  renamed into place.
* Faults from the machine: a write that fails because the disk is full (``ENOSPC``, a quota), the
  file system is read-only or not ours (``EROFS``, ``EACCES``) or the folder is gone raises
  :class:`OutputError`, one line naming what was written, where, the bytes it needed and those free
  (:func:`shutil.disk_usage`); its temporary file or folder is removed first. :func:`output_error`
  recognises such a fault behind any exception (torch's zip writer and safetensors wrap the
  ``OSError``).
* Held folders (:func:`hold`, :func:`release`; :mod:`cola.llm.lock` holds a run's output folder): a
  write beneath a held folder never re-creates it, so a folder deleted, moved or unmounted while a
  run writes it is reported instead of silently started afresh.
* :func:`json_default`: the one JSON encoder hook of the project (numpy scalars, tensors, paths,
  dtypes and devices; non-finite floats become ``null``).
* :func:`markdown_table`: a markdown table from a header and rows.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .errors import ColaError

__all__ = ["OutputError", "atomic_write", "atomic_writer", "atomic_folder", "make_folder", "output_error", "hold",
           "release", "write_json", "json_default", "dumps", "markdown_table"]


class OutputError(ColaError):
    """A write failed because of the machine (no space, read-only, no permission, the folder gone);
    nothing half-written is left. ``errno`` and ``path`` say which and where."""

    def __init__(self, message: str, errno_: int | None = None, path: Path | None = None):
        super().__init__(message)
        self.errno, self.path = errno_, path


#: errno -> (what it means, what to do): the faults that are the machine's, not the program's
_FAULTS = {
    errno.ENOSPC: ("no space left on device", "Free some space there"),
    errno.EDQUOT: ("disk quota exceeded", "Free some space there or raise the quota"),
    errno.EROFS: ("read-only file system", "Make the file system writable"),
    errno.EACCES: ("permission denied", "Give this user write permission there"),
    errno.EPERM: ("operation not permitted", "Give this user write permission there"),
    errno.ENOENT: ("the folder is gone", "Restore the folder (or its mount)"),
    errno.ENOTDIR: ("a folder on the way is not a folder", "Restore the folder (or its mount)"),
    errno.ESTALE: ("stale file handle: the folder is gone", "Restore the folder (or its mount)"),
    errno.EIO: ("input/output error", "Check the disk"),
}
_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")   # how Rust libraries (safetensors) report an OSError

_held: dict[Path, int] = {}


def hold(folder: str | os.PathLike) -> None:
    """Mark ``folder`` as a run's output folder: writes beneath it refuse to re-create it once it is gone."""
    key = Path(os.path.abspath(folder))
    _held[key] = _held.get(key, 0) + 1


def release(folder: str | os.PathLike) -> None:
    """Undo one :func:`hold`."""
    key = Path(os.path.abspath(folder))
    if _held.get(key, 0) <= 1:
        _held.pop(key, None)
    else:
        _held[key] -= 1


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _kind(path: Path) -> str:
    """What a path holds, for a message: ``checkpoint``, ``JSON file``, ``plot``, ..."""
    return {".pt": "checkpoint", ".json": "JSON file", ".csv": "CSV file", ".md": "markdown file", ".png": "plot",
            ".lock": "lock file"}.get(path.suffix, "folder" if not path.suffix else "file")


def _fault_errno(err: BaseException) -> int | None:
    """The errno of the machine fault behind ``err`` (itself, its cause or context, or a message naming one)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FAULTS:
            return err.errno
        found = _OS_ERROR.search(str(err)) if not isinstance(err, OSError) else None
        if found and int(found.group(1)) in _FAULTS:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


def _free(path: Path) -> int | None:
    """Bytes free on the file system of ``path`` (its nearest existing folder), None if unknown."""
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def output_error(err: BaseException, path: str | os.PathLike, what: str | None = None, needed: int | None = None,
                 written: int | None = None) -> OutputError | None:
    """The :class:`OutputError` for ``err`` when a machine fault is behind it, else None.

    ``needed``: the bytes the write needs, when known; ``written``: the bytes it had written when it failed.
    Without ``needed`` the size of the file or folder at ``path`` (the one the write replaces, e.g. the
    previous checkpoint) is the estimate; a first write of unknown size names the free space only."""
    if isinstance(err, OutputError):
        return err
    code = _fault_errno(err)
    if code is None:
        return None
    path = Path(path)
    reason, advice = _FAULTS[code]
    detail = ""
    if code in _SPACE:
        free = _free(path.parent)
        previous = _bytes_in(str(path)) if needed is None else 0   # the file or folder it replaces: about its size
        need = (f"it needs {_size(needed)}" if needed is not None else
                f"it needs about {_size(previous)}, the size of the one it replaces" if previous > (written or 0) else
                f"it needs more than the {_size(written)} written when the disk filled" if written else "")
        room = f"{_size(free)} free there" if free is not None else ""
        detail = f" ({'; '.join(p for p in (need, room) if p)})" if need or room else ""
    return OutputError(f"cannot write {what or _kind(path)} {path}: {reason}{detail}; nothing half-written is left. "
                       f"{advice}", code, path)


def _vanished(path: Path) -> Path | None:
    """The held folder above ``path`` that no longer exists, if any."""
    full = Path(os.path.abspath(path))
    for root in _held:
        if (root == full or root in full.parents) and not root.is_dir():
            return root
    return None


def make_folder(path: str | os.PathLike, what: str | None = None) -> Path:
    """``path`` and its parents as folders; a machine fault is an :class:`OutputError`, and so is a held
    folder above ``path`` that is gone (it is not re-created)."""
    path = Path(path)
    gone = _vanished(path)
    if gone is not None:
        raise OutputError(f"cannot write {what or _kind(path)} {path}: the output folder {gone} is gone (deleted, "
                          "moved or unmounted while the run was writing it); nothing half-written is left. Restore "
                          "the folder (or its mount)", errno.ENOENT, path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, path, what or "folder") or err from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bytes_in(path: str) -> int:
    """Bytes under ``path`` (a file or a folder) as it is now; 0 if it is gone."""
    try:
        if os.path.isdir(path):
            return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return os.path.getsize(path)
    except OSError:
        return 0


def atomic_writer(path: str | os.PathLike, write: Callable[[IO[bytes]], None], what: str | None = None,
                  size: int | None = None) -> Path:
    """Call ``write(handle)`` on a temporary binary file beside ``path``, then rename it into place.

    The parent folder is created when missing (unless it lies in a held folder that is gone). On any
    exception the temporary file is removed and ``path`` keeps its previous content; a machine fault
    becomes an :class:`OutputError` (``what`` names the file in it, ``size`` is the bytes it needs).
    """
    path = Path(path)
    make_folder(path.parent, what or _kind(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(err, path, what, size) or err from None
    try:
        with os.fdopen(fd, "w+b") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = _bytes_in(tmp)
        Path(tmp).unlink(missing_ok=True)
        fault = output_error(err, path, what, size, written)
        if fault is not None:
            raise fault from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8", what: str | None = None) -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` atomically."""
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    return atomic_writer(path, lambda handle: handle.write(payload), what, len(payload))


def atomic_folder(folder: str | os.PathLike, write: Callable[[Path], None], what: str | None = None) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``folder``, then put it in ``folder``'s place.

    A previous ``folder`` is moved aside first and removed after, so a crash leaves the old folder, the
    new one, or (between the two renames) the old one under a temporary name. On any exception the
    temporary folder is removed; a machine fault becomes an :class:`OutputError`.
    """
    folder = Path(folder)
    make_folder(folder.parent, what or "folder")
    try:
        tmp = tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent)
    except OSError as err:
        raise output_error(err, folder, what or "folder") or err from None
    old = None
    try:
        write(Path(tmp))
        if folder.exists():
            old = tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException as err:
        written = _bytes_in(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists() and os.path.isdir(old):
            os.replace(old, folder)   # put the previous folder back
        fault = output_error(err, folder, what or "folder", None, written)
        if fault is not None:
            raise fault from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder.parent)
    return folder


def json_default(obj: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, tensors, paths, dtypes."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (non-finite floats as ``null``), ending with a newline."""
    return json.dumps(_finite(obj), indent=indent, default=json_default, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, what: str | None = None) -> Path:
    """``obj`` as JSON (see :func:`dumps`), written atomically."""
    return atomic_write(path, dumps(obj, indent), what=what)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table. Cells are ``str()``-ed (floats to 3 significant digits, ``None`` as –;
    ``|`` escaped); format numbers yourself for other precisions. No trailing newline."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {list(row)!r}")
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)
