"""Run the tiny problems of the checks on one thread (torch and numpy's OpenBLAS).

On a 2-core machine, two intra-op threads made small LAPACK calls dramatically slower here
(torch QR of an 8x16 matrix: 16 ms vs 7 us; numpy eigvalsh of 768x768: 4.5 s vs 0.03 s),
so the command line and the tests pin both libraries to one thread while they run.
numpy exposes no thread control, so OpenBLAS's own setter is called through ctypes when
numpy bundles it; anything else is left alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from typing import Callable, Iterator

import torch

__all__ = ["single_threaded"]


def _openblas_controls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    import numpy

    libdir = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                return getter, setter
    return None


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Inside the block torch and (when found) numpy's OpenBLAS use one thread; restored after."""
    torch_threads = torch.get_num_threads()
    blas = _openblas_controls()
    blas_threads = blas[0]() if blas else None
    torch.set_num_threads(1)
    if blas:
        blas[1](1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if blas and blas_threads:
            blas[1](blas_threads)
