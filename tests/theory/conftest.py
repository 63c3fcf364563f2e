"""Shared set-up of the theory tests: one thread (torch and numpy's OpenBLAS) while they run.

The problems are tiny; with two threads small LAPACK calls were measured 100-2000x slower on
the 2-core CI machine (see cola_theory.threads).
"""
import pytest

from cola_theory.threads import single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_threaded():
        yield
