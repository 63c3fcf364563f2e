"""Synthetic matrix problems whose constants are computable exactly.

Every problem is a linear model in a matrix variable ``W`` (``d x k``):

    f(W) = (1/n) sum_i loss(x_i^T W, y_i) + (reg/2) ||W||_F^2

with the design ``X`` (``n x d``) and one of three losses:

- ``"squares"``  loss(z, y) = ||z - y||^2 / 2     (least squares; convex)
- ``"cauchy"``   loss(z, y) = sum_j (c^2/2) log(1 + ((z_j - y_j)/c)^2)  (robust; non-convex)
- ``"softmax"``  loss(z, y) = logsumexp(z) - z_y  (multinomial logistic; convex)

The Hessian of f is (1/n) sum_i (x_i x_i^T) (x) S_i + reg I, where S_i is the Hessian of the
loss in its first argument. Its spectral norm is therefore at most
``c_loss * lambda_max(X^T X) / n + reg`` with ``c_loss`` = 1 (squares; exact), 1 (cauchy:
|rho''| <= 1) and 1/2 (softmax: diag(p) - p p^T <= I/2 by Gershgorin). That is the
smoothness constant ``beta`` each problem carries; ``lambda_max(X^T X)`` comes from a
backward-stable symmetric eigensolver, inflated by a relative 1e-9 (far above its rounding
error), and :func:`trace_power_bound` gives an independent certified upper bound.

Every problem also carries the constraint set K of the Frank-Wolfe view (a nuclear-norm or
Frobenius ball centred at 0, of radius R and Frobenius diameter D = 2R), its start point
``W0 = 0`` (which lies in K), ``f_star`` (the exact minimum, or a certified lower bound when
``f_star_exact`` is False) and the value-gap bound ``M = f(W0) - f_star``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "Ball",
    "Problem",
    "least_squares",
    "cauchy_regression",
    "logistic_regression",
    "counterexample_quadratic",
    "standard_problems",
    "trace_power_bound",
    "power_iteration",
]

# Relative margin on every certified constant (beta inflated, mu deflated by it), so that a
# constant still bounds what is computed in floating point: numpy's eigvalsh is backward
# stable (error a small multiple of d * machine-eps * ||A||, far below 1e-9), and a Hessian
# assembled in float64 is off by a few ulps even where the true value is exact (e.g. 10).
_CERTIFY_MARGIN = 1e-9

LossName = Literal["squares", "cauchy", "softmax"]
_LOSS_CURVATURE = {"squares": 1.0, "cauchy": 1.0, "softmax": 0.5}


# --------------------------------------------------------------------------------------------
# The constraint set K


@dataclasses.dataclass(frozen=True)
class Ball:
    """K = {W : ||W|| <= radius} in the nuclear or the Frobenius norm, centred at 0.

    Its Frobenius-norm diameter is 2 * radius in both cases (||.||_F <= ||.||_*).
    """

    norm: Literal["nuclear", "frobenius"]
    radius: float

    def __post_init__(self) -> None:
        if self.norm not in ("nuclear", "frobenius"):
            raise ValueError(f"Ball.norm must be 'nuclear' or 'frobenius', got {self.norm!r}")
        if not self.radius > 0:
            raise ValueError(f"Ball.radius must be > 0, got {self.radius!r}")

    @property
    def diameter(self) -> float:
        """Frobenius diameter D = max ||V - V'||_F over V, V' in K."""
        return 2.0 * self.radius

    def norm_of(self, W: np.ndarray) -> float:
        """The ball's norm of ``W``."""
        if self.norm == "nuclear":
            return float(np.linalg.svd(W, compute_uv=False).sum())
        return float(np.linalg.norm(W))

    def contains(self, W: np.ndarray, rtol: float = 1e-9) -> bool:
        return self.norm_of(W) <= self.radius * (1.0 + rtol)

    def lmo(self, G: np.ndarray) -> np.ndarray:
        """Exact linear minimiser argmin_{V in K} <V, G>.

        Nuclear ball: -R u1 v1^T (top singular pair of G); Frobenius ball: -R G / ||G||_F.
        """
        if self.norm == "nuclear":
            U, _, Vt = np.linalg.svd(G, full_matrices=False)
            return -self.radius * np.outer(U[:, 0], Vt[0])
        nrm = np.linalg.norm(G)
        if nrm == 0.0:
            return np.zeros_like(G)
        return -self.radius * G / nrm

    def lmo_value(self, G: np.ndarray) -> float:
        """min_{V in K} <V, G> = -R * dual norm of G (sigma_1 for nuclear, ||.||_F for Frobenius)."""
        if self.norm == "nuclear":
            return -self.radius * float(np.linalg.norm(G, 2))
        return -self.radius * float(np.linalg.norm(G))

    def gap(self, G: np.ndarray, W: np.ndarray) -> float:
        """Frank-Wolfe gap g = max_{V in K} <G, W - V> = <G, W> + R * dual norm of G."""
        return float(np.vdot(G, W)) - self.lmo_value(G)

    def along(self, direction: np.ndarray) -> np.ndarray:
        """The point of the boundary of K in the given direction: R * direction / ||direction||."""
        nrm = self.norm_of(direction)
        if nrm == 0.0:
            return np.zeros_like(direction)
        return self.radius * direction / nrm

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "radius": self.radius, "diameter": self.diameter}


# --------------------------------------------------------------------------------------------
# Certified spectral bounds


def trace_power_bound(S: np.ndarray, squarings: int = 10) -> float:
    """Certified upper bound on lambda_max of a symmetric PSD matrix.

    lambda_max^(2^j) <= tr(S^(2^j)), so lambda_max <= tr(S^(2^j))^(1/2^j); the bound exceeds
    lambda_max by at most a factor dim^(1/2^j). Computed with renormalised repeated squaring.
    """
    S = np.asarray(S, dtype=np.float64)
    S = (S + S.T) / 2.0
    tr = float(np.trace(S))
    if tr <= 0.0:
        return 0.0
    log_tr = math.log(tr)  # log tr(S^(2^j)) for j = 0
    Mj = S / tr  # S^(2^j) = exp(log_tr) * Mj with tr(Mj) = 1
    for j in range(squarings):
        M2 = Mj @ Mj
        t2 = float(np.trace(M2))
        if t2 <= 0.0:
            break
        log_tr = 2.0 * log_tr + math.log(t2)
        Mj = M2 / t2
    else:
        j = squarings
    return math.exp(log_tr / 2.0 ** j) * (1.0 + _CERTIFY_MARGIN)


def power_iteration(
    matvec, dim: int, iters: int = 200, seed: int = 0
) -> tuple[float, np.ndarray]:
    """Rayleigh-quotient estimate (a lower bound) of lambda_max of a symmetric PSD operator."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(v @ w)
        nrm = np.linalg.norm(w)
        if nrm == 0.0:
            return 0.0, v
        v = w / nrm
    return lam, v


def _gram_extremes(X: np.ndarray) -> tuple[float, float]:
    n = X.shape[0]
    eig = np.linalg.eigvalsh(X.T @ X / n)
    return float(eig[-1]), float(eig[0])


# --------------------------------------------------------------------------------------------
# The problem


@dataclasses.dataclass
class Problem:
    """A smooth matrix problem f(W) = (1/n) sum_i loss(x_i^T W, y_i) + (reg/2)||W||^2.

    ``beta``: certified smoothness constant; ``mu``: PL constant (None when not known);
    ``f_star``: the minimum (exact if ``f_star_exact``, else a certified lower bound).
    """

    name: str
    X: np.ndarray
    Y: np.ndarray  # (n, k) targets, or (n,) integer labels for softmax
    loss: LossName
    ball: Ball
    beta: float
    f_star: float
    f_star_exact: bool
    mu: float | None = None
    reg: float = 0.0
    cauchy_scale: float = 1.0
    W0: np.ndarray | None = None
    minimiser: np.ndarray | None = None
    description: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.W0 is None:
            self.W0 = np.zeros(self.shape)

    # shapes -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (d, k) of the matrix variable W."""
        k = int(self.info["classes"]) if self.loss == "softmax" else self.Y.shape[1]
        return (self.X.shape[1], k)

    # values and gradients -------------------------------------------------------------------
    def _loss_and_dz(self, Z: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
        """Sum over rows of loss(z_i, y_i) and its gradient in Z."""
        if self.loss == "squares":
            R = Z - Y
            return 0.5 * float(np.sum(R * R)), R
        if self.loss == "cauchy":
            c = self.cauchy_scale
            R = Z - Y
            q = (R / c) ** 2
            return 0.5 * c * c * float(np.sum(np.log1p(q))), R / (1.0 + q)
        # softmax cross-entropy
        zmax = Z.max(axis=1, keepdims=True)
        E = np.exp(Z - zmax)
        S = E.sum(axis=1, keepdims=True)
        lse = (zmax + np.log(S))[:, 0]
        rows = np.arange(Z.shape[0])
        P = E / S
        P[rows, Y] -= 1.0
        return float(np.sum(lse - Z[rows, Y])), P

    def value(self, W: np.ndarray) -> float:
        return self.value_and_grad(W)[0]

    def grad(self, W: np.ndarray) -> np.ndarray:
        return self.value_and_grad(W)[1]

    def value_and_grad(self, W: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """f(W) and grad f(W); with ``rows`` the same on that minibatch (a stochastic gradient)."""
        X = self.X if rows is None else self.X[rows]
        Y = self.Y if rows is None else self.Y[rows]
        m = X.shape[0]
        total, dZ = self._loss_and_dz(X @ W, Y)
        value = total / m + 0.5 * self.reg * float(np.sum(W * W))
        grad = X.T @ dZ / m + self.reg * W
        return value, grad

    def hessian(self, W: np.ndarray) -> np.ndarray:
        """Exact Hessian of f at W on vec(W) (row-major, W.ravel()); for tests of beta and mu."""
        d, k = self.shape
        X, n = self.X, self.n
        Z = X @ W
        if self.loss == "squares":  # (X^T X / n) (x) I
            H = np.kron(X.T @ X / n, np.eye(k))
        elif self.loss == "cauchy":  # block (a, c), (b, c): X^T diag(rho''(r_c)) X / n
            c = self.cauchy_scale
            q = ((Z - self.Y) / c) ** 2
            w = (1.0 - q) / (1.0 + q) ** 2
            blocks = np.einsum("ia,ic,ib->acb", X, w, X, optimize=True) / n
            H = np.zeros((d, k, d, k))
            idx = np.arange(k)
            H[:, idx, :, idx] = blocks.transpose(1, 0, 2)
            H = H.reshape(d * k, d * k)
        else:  # (1/n) sum_i (x_i x_i^T) (x) (diag(p_i) - p_i p_i^T)
            P = np.exp(Z - Z.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            S = P[:, :, None] * np.eye(k)[None] - P[:, :, None] * P[:, None, :]
            XS = X[:, :, None, None] * S[:, None, :, :]  # (n, a, c, e)
            H = np.tensordot(X, XS, axes=([0], [0]))  # (b, a, c, e)
            H = H.transpose(1, 2, 0, 3).reshape(d * k, d * k) / n
        return H + self.reg * np.eye(d * k)

    # the torch side, for models trained by cola.Chain --------------------------------------------
    def torch_loss(self, Z: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
        """f computed from the model output Z = X W (or X[rows] W) in torch (no reg term on Z).

        The reg term needs W itself; pass it through :meth:`torch_reg`.
        """
        Y = self.Y if rows is None else self.Y[rows]
        m = Z.shape[0]
        if self.loss == "softmax":
            target = torch.as_tensor(Y, dtype=torch.long)
            return torch.nn.functional.cross_entropy(Z, target, reduction="sum") / m
        Yt = torch.as_tensor(Y, dtype=Z.dtype)
        R = Z - Yt
        if self.loss == "squares":
            return 0.5 * (R * R).sum() / m
        c = self.cauchy_scale
        return 0.5 * c * c * torch.log1p((R / c) ** 2).sum() / m

    def torch_reg(self, W: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.reg * (W * W).sum()

    # constants ------------------------------------------------------------------------------
    @property
    def M(self) -> float:
        """Value-gap bound M = f(W0) - f_star >= f(W0) - min_K f."""
        return self.value(self.W0) - self.f_star

    @property
    def D(self) -> float:
        return self.ball.diameter

    def low_rank_floor(self, rank: int) -> float:
        """min f over W of rank <= ``rank`` (least squares, reg = 0, X of full column rank).

        ||XW - Y||^2 = ||X(W - W_ls)||^2 + ||X W_ls - Y||^2 and X W ranges over rank-r
        matrices in range(X), so by Eckart-Young the floor is
        f* + (1/2n) sum_{i > r} sigma_i(X W_ls)^2.
        """
        if self.loss != "squares" or self.reg != 0.0 or self.minimiser is None:
            raise ValueError("low_rank_floor needs an unregularised least-squares problem")
        s = np.linalg.svd(self.X @ self.minimiser, compute_uv=False)
        return self.f_star + 0.5 * float(np.sum(s[rank:] ** 2)) / self.n

    def constants(self) -> dict[str, Any]:
        """The constants the bounds use, for reports."""
        d, k = self.shape
        return {
            "name": self.name,
            "loss": self.loss,
            "n": self.n,
            "d": d,
            "k": k,
            "beta": self.beta,
            "mu": self.mu,
            "f_star": self.f_star,
            "f_star_exact": self.f_star_exact,
            "f_W0": self.value(self.W0),
            "M": self.M,
            "K": self.ball.to_dict(),
            "description": self.description,
            **{k_: v for k_, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }


# --------------------------------------------------------------------------------------------
# Constructors


def _design(rng: np.random.Generator, n: int, d: int, condition: float) -> np.ndarray:
    """X (n x d) with X^T X / n having eigenvalues geometrically spaced in [1/condition, 1]."""
    if n < d:
        raise ValueError(f"need n >= d for a full-column-rank design, got n={n}, d={d}")
    Q1, _ = np.linalg.qr(rng.standard_normal((n, d)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.geomspace(1.0, 1.0 / condition, d) if d > 1 else np.ones(1)
    return math.sqrt(n) * (Q1 * np.sqrt(eig)) @ Q2.T


def _low_rank(rng: np.random.Generator, d: int, k: int, rank: int, scale: float, condition: float) -> np.ndarray:
    """A d x k matrix of the given rank; singular values geometric from ``scale`` down by ``condition``."""
    rank = max(1, min(rank, d, k))
    U, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((k, rank)))
    s = scale * (np.geomspace(1.0, 1.0 / condition, rank) if rank > 1 else np.ones(1))
    return (U * s) @ V.T


def least_squares(
    n: int = 120,
    d: int = 16,
    k: int = 12,
    target_rank: int = 6,
    target_condition: float = 4.0,
    target_scale: float = 2.0,
    x_condition: float = 10.0,
    noise: float = 0.05,
    norm: Literal["nuclear", "frobenius"] = "nuclear",
    radius_factor: float = 1.0,
    seed: int = 0,
) -> Problem:
    """Least-squares matrix regression f(W) = ||XW - Y||^2 / (2n), Y = X W_target + noise.

    W_target has rank ``target_rank`` with singular values from ``target_scale`` down by a
    factor ``target_condition``; X^T X / n has condition number ``x_condition``. Exact constants:
    beta = lambda_max(X^T X / n), mu = lambda_min(X^T X / n), f* = f(W_ls) by least squares.
    K is the ball of radius ``radius_factor * ||W_ls||`` (so W_ls lies in K for factor >= 1).
    """
    rng = np.random.default_rng(seed)
    X = _design(rng, n, d, x_condition)
    W_target = _low_rank(rng, d, k, target_rank, target_scale, target_condition)
    Y = X @ W_target + noise * rng.standard_normal((n, k))
    W_ls = np.linalg.lstsq(X, Y, rcond=None)[0]
    lmax, lmin = _gram_extremes(X)
    probe = Problem(
        name="least-squares", X=X, Y=Y, loss="squares", ball=Ball(norm, 1.0), beta=0.0,
        f_star=0.0, f_star_exact=True,
    )
    f_star = probe.value(W_ls)
    radius = radius_factor * Ball(norm, 1.0).norm_of(W_ls)
    return Problem(
        name=f"least-squares(rank {target_rank}, kappa {x_condition:g})",
        X=X,
        Y=Y,
        loss="squares",
        ball=Ball(norm, radius),
        beta=lmax * (1.0 + _CERTIFY_MARGIN),
        mu=lmin * (1.0 - _CERTIFY_MARGIN),
        f_star=f_star,
        f_star_exact=True,
        minimiser=W_ls,
        description=(
            f"||XW-Y||^2/(2n), n={n}, W {d}x{k}, target rank {target_rank}, "
            f"cond(X^T X)={x_condition:g}, noise {noise:g}"
        ),
        info={
            "target_rank": target_rank,
            "x_condition": x_condition,
            "target_condition": target_condition,
            "noise": noise,
            "seed": seed,
        },
    )


def cauchy_regression(
    n: int = 120,
    d: int = 16,
    k: int = 8,
    target_rank: int = 4,
    target_scale: float = 3.0,
    scale: float = 0.5,
    outlier_fraction: float = 0.1,
    outlier_scale: float = 10.0,
    x_condition: float = 5.0,
    norm: Literal["nuclear", "frobenius"] = "nuclear",
    radius_factor: float = 1.0,
    seed: int = 0,
) -> Problem:
    """Robust regression with the Cauchy loss (c^2/2) log(1 + (r/c)^2): smooth and non-convex.

    rho'' = (1 - (r/c)^2) / (1 + (r/c)^2)^2 lies in [-1/8, 1], so beta = lambda_max(X^T X)/n.
    f >= 0 gives the certified lower bound f_star = 0 (exact when there are no outliers).
    K has radius ``radius_factor * ||W_target||``.
    """
    rng = np.random.default_rng(seed)
    X = _design(rng, n, d, x_condition)
    W_target = _low_rank(rng, d, k, target_rank, target_scale, 2.0)
    Y = X @ W_target
    mask = rng.random((n, k)) < outlier_fraction
    Y = Y + mask * outlier_scale * rng.standard_normal((n, k))
    lmax, _ = _gram_extremes(X)
    radius = radius_factor * Ball(norm, 1.0).norm_of(W_target)
    return Problem(
        name=f"cauchy(c {scale:g}, outliers {outlier_fraction:g})",
        X=X,
        Y=Y,
        loss="cauchy",
        cauchy_scale=scale,
        ball=Ball(norm, radius),
        beta=lmax * (1.0 + _CERTIFY_MARGIN),
        mu=None,
        f_star=0.0,
        f_star_exact=not mask.any(),
        minimiser=W_target if not mask.any() else None,
        description=(
            f"Cauchy robust regression, c={scale:g}, n={n}, W {d}x{k}, target rank {target_rank}, "
            f"{int(mask.sum())} outliers; f* >= 0"
        ),
        info={"target_rank": target_rank, "x_condition": x_condition, "seed": seed},
    )


def _softmax_newton(problem: Problem, W: np.ndarray, tol: float = 1e-12, max_iter: int = 50) -> np.ndarray:
    """Damped Newton's method for the strongly convex regularised softmax problem."""
    d, k = problem.shape
    for _ in range(max_iter):
        f, G = problem.value_and_grad(W)
        if np.linalg.norm(G) < tol:
            break
        H = problem.hessian(W)
        step = np.linalg.solve(H, G.ravel()).reshape(d, k)
        dec = float(G.ravel() @ step.ravel())
        t = 1.0
        while problem.value(W - t * step) > f - 0.25 * t * dec and t > 1e-10:
            t *= 0.5
        W = W - t * step
    return W


def logistic_regression(
    n: int = 150,
    d: int = 12,
    classes: int = 4,
    reg: float = 0.05,
    separation: float = 2.0,
    x_condition: float = 5.0,
    norm: Literal["nuclear", "frobenius"] = "nuclear",
    radius_factor: float = 1.0,
    seed: int = 0,
) -> Problem:
    """Multinomial logistic regression with L2 regularisation ``reg`` (strongly convex).

    beta = lambda_max(X^T X)/(2n) + reg (softmax Hessian <= I/2); mu = reg (PL);
    f_star = f(W_hat) - ||grad f(W_hat)||^2 / (2 reg) after Newton's method: a certified lower
    bound within ~1e-20 of the minimum. K has radius ``radius_factor * ||W_hat||``.
    """
    rng = np.random.default_rng(seed)
    X = _design(rng, n, d, x_condition)
    W_true = separation * rng.standard_normal((d, classes)) / math.sqrt(d)
    logits = X @ W_true + rng.gumbel(size=(n, classes))
    y = logits.argmax(axis=1)
    lmax, _ = _gram_extremes(X)
    problem = Problem(
        name=f"logistic({classes} classes, reg {reg:g})",
        X=X,
        Y=y,
        loss="softmax",
        reg=reg,
        ball=Ball(norm, 1.0),
        beta=(0.5 * lmax + reg) * (1.0 + _CERTIFY_MARGIN),
        mu=reg * (1.0 - _CERTIFY_MARGIN),
        f_star=0.0,
        f_star_exact=False,
        description=f"softmax regression, n={n}, W {d}x{classes}, L2 {reg:g}",
        info={"classes": classes, "x_condition": x_condition, "seed": seed},
    )
    W_hat = _softmax_newton(problem, np.zeros((d, classes)))
    f_hat, G = problem.value_and_grad(W_hat)
    problem.f_star = f_hat - float(np.sum(G * G)) / (2.0 * reg)
    problem.minimiser = W_hat
    problem.ball = Ball(norm, radius_factor * Ball(norm, 1.0).norm_of(W_hat))
    return problem


def counterexample_quadratic(
    d: int = 8,
    k: int = 8,
    curvature: float = 10.0,
    target_scale: float = 2.0,
    target_rank: int | None = None,
    norm: Literal["nuclear", "frobenius"] = "nuclear",
    seed: int = 0,
) -> Problem:
    """RAC-LoRA's toy quadratic f(W) = (1/2) sum_i h_i ||row_i(W - W*)||^2, h = (10, 1, ..., 1).

    Each column of W sees the Hessian diag(10, 1, ..., 1); beta = 10, mu = 1 (each with the
    1e-9 rounding margin), f* = 0 exactly.
    Written as least squares with X = sqrt(d) diag(sqrt(h)), Y = X W*.
    """
    rng = np.random.default_rng(seed)
    h = np.ones(d)
    h[0] = curvature
    X = math.sqrt(d) * np.diag(np.sqrt(h))
    rank = min(d, k) if target_rank is None else target_rank
    W_star = _low_rank(rng, d, k, rank, target_scale, 2.0)
    Y = X @ W_star
    return Problem(
        name="rac-quadratic",
        X=X,
        Y=Y,
        loss="squares",
        ball=Ball(norm, Ball(norm, 1.0).norm_of(W_star)),
        beta=float(h.max()) * (1.0 + _CERTIFY_MARGIN),
        mu=float(h.min()) * (1.0 - _CERTIFY_MARGIN),
        f_star=0.0,
        f_star_exact=True,
        minimiser=W_star,
        description=f"quadratic, Hessian diag({curvature:g}, 1, ..., 1) per column, W {d}x{k}",
        info={"curvature": curvature, "target_rank": rank, "seed": seed},
    )


def standard_problems(seed: int = 0, full: bool = False) -> dict[str, Problem]:
    """The problems the default checks run on, keyed by a short name."""
    scale = 2 if full else 1
    return {
        "ls-low": least_squares(
            n=120 * scale, d=16 * scale, k=12 * scale, target_rank=2, seed=seed
        ),
        "ls-high": least_squares(
            n=120 * scale, d=16 * scale, k=12 * scale, target_rank=10 * scale,
            x_condition=100.0, seed=seed + 1,
        ),
        "cauchy": cauchy_regression(n=120 * scale, d=16 * scale, k=8 * scale, seed=seed + 2),
        "logistic": logistic_regression(n=150 * scale, d=12 * scale, seed=seed + 3),
        "quadratic": counterexample_quadratic(d=8 * scale, k=8 * scale, seed=seed + 4),
    }
