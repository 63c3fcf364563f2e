"""Run the tiny problems of the checks on one thread (torch and numpy's BLAS).

On a 2-core machine, two intra-op threads made small LAPACK calls dramatically slower here
(torch QR of an 8x16 matrix: 16 ms vs 7 us; numpy eigvalsh of 768x768: 4.5 s vs 0.03 s),
so the command line and the tests pin both libraries to one thread while they run.
numpy exposes no thread control: threadpoolctl limits the BLAS libraries loaded in the
process (OpenBLAS, MKL, BLIS), torch is limited with ``torch.set_num_threads``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits

__all__ = ["single_threaded"]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Inside the block torch and the BLAS libraries (numpy's included) use one thread; restored after."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)
