"""Reference algorithms in float64 numpy: the idealised COLA (Frank-Wolfe), RAC-LoRA, full GD.

These are the algorithms whose assumptions the bounds state. The same algorithms run through
the real ``cola.Chain`` live in :mod:`cola_theory.chains`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from .bounds import fw_step_size, rac_lambda_gaussian
from .problems import Problem

__all__ = [
    "Trajectory",
    "frank_wolfe",
    "rac_projected_gd",
    "gradient_descent",
    "gaussian_projection",
    "noisy_lmo",
    "rac_expected_next_value",
]

log = logging.getLogger(__name__)

# An oracle for the linear sub-problem: (gradient estimate, step t, iterate W) -> V in K.
LinearOracle = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Trajectory:
    """What one run recorded. Index t = 0 is the start point W_1 (the paper's indexing)."""

    losses: np.ndarray  # f(W_t), t = 0..T
    grad_sq: np.ndarray  # ||grad f(W_t)||_F^2, t = 0..T
    gaps: np.ndarray | None = None  # FW gap at W_t, t = 0..T-1
    eps: np.ndarray | None = None  # measured inexactness of the linear minimiser, t = 0..T-1
    W: np.ndarray | None = None  # final iterate
    step: float = 0.0  # eta (FW) or gamma (RAC, GD)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def T(self) -> int:
        return len(self.losses) - 1

    @property
    def mean_gap(self) -> float:
        return float(np.mean(self.gaps))


def frank_wolfe(
    problem: Problem,
    T: int,
    eta: float | None = None,
    lmo: LinearOracle | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> Trajectory:
    """Idealised COLA (paper's Algorithm 2): W_{t+1} = W_t + eta (V_t - W_t), V_t in K.

    ``lmo=None`` is the exact linear minimiser of K; ``batch_size`` feeds it a minibatch gradient
    (stochastic Frank-Wolfe). Every step records the exact FW gap g_t (full gradient) and the
    inexactness actually achieved, eps_t = <V_t, grad f(W_t)> - min_{V in K} <V, grad f(W_t)>.
    ``eta=None`` takes the proof's step sqrt(2M/(beta D^2 T)), clipped to 1.
    """
    ball = problem.ball
    if eta is None:
        eta = fw_step_size(problem.M, problem.beta, ball.diameter, T)
        if eta > 1.0:
            log.warning("proof step %.3g > 1 for %s, T=%d: clipped to 1", eta, problem.name, T)
            eta = 1.0
    rng = np.random.default_rng(seed)
    W = problem.W0.copy()
    losses, grad_sq, gaps, eps = [], [], [], []
    for t in range(T):
        f, G = problem.value_and_grad(W)
        losses.append(f)
        grad_sq.append(float(np.sum(G * G)))
        gaps.append(ball.gap(G, W))
        if batch_size is not None and batch_size < problem.n:
            rows = rng.choice(problem.n, size=batch_size, replace=False)
            G_hat = problem.value_and_grad(W, rows)[1]
        else:
            G_hat = G
        V = ball.lmo(G_hat) if lmo is None else lmo(G_hat, t, W)
        eps.append(float(np.vdot(V, G)) - ball.lmo_value(G))
        W = W + eta * (V - W)
    f, G = problem.value_and_grad(W)
    losses.append(f)
    grad_sq.append(float(np.sum(G * G)))
    return Trajectory(
        losses=np.array(losses),
        grad_sq=np.array(grad_sq),
        gaps=np.array(gaps),
        eps=np.array(eps),
        W=W,
        step=eta,
    )


def noisy_lmo(problem: Problem, mix: float, seed: int = 0) -> LinearOracle:
    """An inexact oracle: (1 - mix) * exact minimiser + mix * a random point of K's boundary."""
    rng = np.random.default_rng(seed)
    ball = problem.ball

    def oracle(G: np.ndarray, t: int, W: np.ndarray) -> np.ndarray:
        random_point = ball.along(rng.standard_normal(G.shape))
        return (1.0 - mix) * ball.lmo(G) + mix * random_point

    return oracle


def gaussian_projection(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    """H = S (S^T S)^+ S^T for a Gaussian sketch S (dim x rank): projection onto a random subspace."""
    if rank >= dim:
        return np.eye(dim)
    S = rng.standard_normal((dim, rank))
    Q, _ = np.linalg.qr(S)  # same range as S, so Q Q^T = S (S^T S)^+ S^T
    return Q @ Q.T


def rac_projected_gd(
    problem: Problem,
    T: int,
    rank: int,
    gamma: float | None = None,
    p_train_a: float = 0.5,
    seed: int = 0,
    keep_iterates: bool = False,
) -> Trajectory:
    """RAC-LoRA with Gaussian sketches in its projected-GD form, one step per link.

    Each link draws the trained LoRA factor by Bernoulli(``p_train_a``): training A with a
    Gaussian B frozen moves W (d x k, the LoRA acts on W^T) by -gamma grad P_k (P_k a random
    rank-r projection of R^k); training B with a Gaussian A frozen by -gamma P_d grad.
    ``gamma=None`` takes 1/beta. Records <g, H g> for the deterministic descent check, and
    with ``keep_iterates`` the iterates W_0 .. W_(T-1).
    """
    d, k = problem.shape
    gamma = 1.0 / problem.beta if gamma is None else gamma
    rng = np.random.default_rng(seed)
    W = problem.W0.copy()
    losses, grad_sq, quad, sides, iterates = [], [], [], [], []
    for _ in range(T):
        if keep_iterates:
            iterates.append(W.copy())
        f, G = problem.value_and_grad(W)
        losses.append(f)
        grad_sq.append(float(np.sum(G * G)))
        if rng.random() < p_train_a:
            HG = G @ gaussian_projection(rng, k, rank)
            sides.append("A")
        else:
            HG = gaussian_projection(rng, d, rank) @ G
            sides.append("B")
        quad.append(float(np.vdot(G, HG)))
        W = W - gamma * HG
    f, G = problem.value_and_grad(W)
    losses.append(f)
    grad_sq.append(float(np.sum(G * G)))
    return Trajectory(
        losses=np.array(losses),
        grad_sq=np.array(grad_sq),
        W=W,
        step=gamma,
        extra={
            "quad": np.array(quad),
            "sides": sides,
            "lambda": rac_lambda_gaussian(rank, d, k, p_train_a),
            "iterates": iterates,
        },
    )


def gradient_descent(problem: Problem, T: int, gamma: float | None = None) -> Trajectory:
    """Full-update gradient descent W <- W - gamma grad f(W), gamma = 1/beta by default."""
    gamma = 1.0 / problem.beta if gamma is None else gamma
    W = problem.W0.copy()
    losses, grad_sq = [], []
    for _ in range(T):
        f, G = problem.value_and_grad(W)
        losses.append(f)
        grad_sq.append(float(np.sum(G * G)))
        W = W - gamma * G
    f, G = problem.value_and_grad(W)
    losses.append(f)
    grad_sq.append(float(np.sum(G * G)))
    return Trajectory(losses=np.array(losses), grad_sq=np.array(grad_sq), W=W, step=gamma)


def rac_expected_next_value(
    problem: Problem, W: np.ndarray, rank: int, gamma: float, p_train_a: float = 0.5
) -> float:
    """Exact E f(W - gamma H grad f(W)) over RAC-LoRA's Gaussian sketches, for least squares.

    f is quadratic with Hessian S = X^T X / n acting on the left, so with G = grad f(W):
    training A (H G = G P, P a uniformly random rank-r projection of R^k) gives
    f - gamma (r/k) ||G||^2 + (gamma^2/2)(r/k) tr(G^T S G), since tr(P G^T S G P) is linear in P;
    training B (H G = P G in R^d) gives f - gamma (r/d) ||G||^2 + (gamma^2/2) tr(G^T E[P S P] G)
    with E[P S P] = a S + b tr(S) I, b = r(d-r)/(d(d+2)(d-1)), a = r(r+2)/(d(d+2)) - b
    (from E[P_11^2] = r(r+2)/(d(d+2)) and E tr(P S) = (r/d) tr S).
    """
    if problem.loss != "squares" or problem.reg != 0.0:
        raise ValueError("rac_expected_next_value needs an unregularised least-squares problem")
    d, k = problem.shape
    f, G = problem.value_and_grad(W)
    S = problem.X.T @ problem.X / problem.n
    g2 = float(np.sum(G * G))
    curv = float(np.sum(G * (S @ G)))  # tr(G^T S G)
    rk = min(rank, k) / k
    right = f - gamma * rk * g2 + 0.5 * gamma**2 * rk * curv
    r = min(rank, d)
    if r == d:
        a, b = 1.0, 0.0
    else:
        b = r * (d - r) / (d * (d + 2) * (d - 1))
        a = r * (r + 2) / (d * (d + 2)) - b
    left = f - gamma * (r / d) * g2 + 0.5 * gamma**2 * (a * curv + b * float(np.trace(S)) * g2)
    return p_train_a * right + (1.0 - p_train_a) * left
