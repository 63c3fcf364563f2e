"""The convergence bounds, as pure functions of the problem constants.

Each docstring states the theorem's assumptions in its first line.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "fw_step_size",
    "fw_gap_bound",
    "fw_gap_bound_for_step",
    "rac_lambda_gaussian",
    "rac_nonconvex_bound",
    "rac_pl_bound",
    "fit_rate_exponent",
]


def fw_step_size(M: float, beta: float, D: float, T: int) -> float:
    """Step size of the proof of Theorem 4.1: eta = sqrt(2 M / (beta D^2 T))."""
    return math.sqrt(2.0 * M / (beta * D * D * T))


def fw_gap_bound(M: float, beta: float, D: float, T: int, eps: float = 0.0) -> float:
    """COLA Theorem 4.1 (beta-smooth f, f(W_1) - f* <= M, K convex of diameter D, eps-inexact
    linear minimiser, eta = sqrt(2M/(beta D^2 T)) <= 1): (1/T) sum_t g_t <= 2 sqrt(M beta) D / sqrt(T) + eps.
    """
    return 2.0 * math.sqrt(M * beta) * D / math.sqrt(T) + eps


def fw_gap_bound_for_step(M: float, beta: float, D: float, T: int, eta: float, eps: float = 0.0) -> float:
    """The proof of Theorem 4.1 for any fixed step eta in (0, 1] (same assumptions):
    (1/T) sum_t g_t <= M / (eta T) + eps + eta beta D^2 / 2.

    Minimised by the proof's eta, where it is sqrt(2) sqrt(M beta) D / sqrt(T) + eps: the
    theorem's constant 2 is a factor sqrt(2) above what the proof sketch gives.
    """
    return M / (eta * T) + eps + eta * beta * D * D / 2.0


def rac_lambda_gaussian(rank: int, d: int, k: int, p_train_a: float = 0.5) -> float:
    """lambda_min(E[H]) for RAC-LoRA with isotropic Gaussian sketches (W is d x k, LoRA on W^T).

    Training A with B (k x r) frozen projects the update onto a random r-subspace of R^k
    (E[H] = (r/k) I); training B with A (r x d) frozen onto one of R^d (E[H] = (r/d) I). With a
    Bernoulli(p) choice of the trained side, E[H] = (p r/k + (1-p) r/d) I on vec(W).
    """
    return p_train_a * min(1.0, rank / k) + (1.0 - p_train_a) * min(1.0, rank / d)


def rac_nonconvex_bound(f0_minus_fstar: float, lam: float, gamma: float, T: int) -> float:
    """RAC-LoRA, smooth non-convex (L-smooth f bounded below, gamma <= 1/L, H_t i.i.d. projections
    with lambda = lambda_min(E[H])): min_{t<T} E||grad f(W_t)||^2 <= 2 (f(W_0) - f*) / (lambda gamma T).
    """
    return 2.0 * f0_minus_fstar / (lam * gamma * T)


def rac_pl_bound(f0_minus_fstar: float, lam: float, gamma: float, mu: float, T: int) -> float:
    """RAC-LoRA under PL (L-smooth, ||grad f||^2 >= 2 mu (f - f*), gamma <= 1/L, i.i.d. projections):
    E f(W_T) - f* <= (1 - gamma mu lambda)^T (f(W_0) - f*).
    """
    return (1.0 - gamma * mu * lam) ** T * f0_minus_fstar


def fit_rate_exponent(Ts: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of log(values) against log(Ts), and its standard error.

    Theorem 4.1 predicts values = O(T^(-1/2)), i.e. a slope of -1/2 or steeper.
    """
    x = np.log(np.asarray(Ts, dtype=np.float64))
    y = np.log(np.asarray(values, dtype=np.float64))
    if x.size < 2:
        raise ValueError("need at least two points to fit a rate")
    A = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    slope = float(coef[0])
    if x.size > 2:
        resid = y - A @ coef
        s2 = float(resid @ resid) / (x.size - 2)
        stderr = math.sqrt(s2 / float(np.sum((x - x.mean()) ** 2)))
    else:
        stderr = 0.0
    return slope, stderr
