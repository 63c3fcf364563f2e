"""Atomic, checksummed checkpoint files.

A checkpoint is ``torch.save``'s file followed by a 40-byte trailer: ``COLACKPT`` and the
SHA-256 of everything before it. It is written to a temporary file, fsynced, then renamed into
place, so a crash leaves the old file or the new one, never half of one (a full or read-only disk
is a :class:`cola.io.OutputError` that names the file and the space it needs, and leaves the old
file too); loading verifies the checksum, so a truncated or corrupted file is refused with a clear
error instead of being half-read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ColaError
from .io import atomic_writer

MAGIC = b"COLACKPT"
TRAILER = len(MAGIC) + 32
_CHUNK = 1 << 22


def _digest(f, length: int) -> bytes:
    h = hashlib.sha256()
    f.seek(0)
    remaining = length
    while remaining > 0:
        block = f.read(min(_CHUNK, remaining))
        if not block:
            break
        h.update(block)
        remaining -= len(block)
    return h.digest()


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`cola.io.atomic_writer`), with a SHA-256 trailer."""
    def write(f) -> None:
        torch.save(obj, f)
        f.flush()
        size = f.seek(0, os.SEEK_END)
        digest = _digest(f, size)
        f.seek(0, os.SEEK_END)
        f.write(MAGIC + digest)

    return atomic_writer(path, write)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`ColaError` unless ``path`` is a complete checkpoint whose checksum matches."""
    path = Path(path)
    if not path.is_file():
        raise ColaError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < TRAILER:
            raise ColaError(f"checkpoint {str(path)!r} is truncated ({size} bytes)")
        f.seek(size - TRAILER)
        trailer = f.read(TRAILER)
        if not trailer.startswith(MAGIC):
            raise ColaError(f"checkpoint {str(path)!r} has no checksum trailer: truncated, or not written "
                            f"by cola.save_checkpoint")
        if _digest(f, size - TRAILER) != trailer[len(MAGIC):]:
            raise ColaError(f"checkpoint {str(path)!r} is corrupted: its SHA-256 does not match")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`, after verifying its checksum."""
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise ColaError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
