"""The synthetic problems: values, gradients and certified constants are right."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory.problems import (
    Ball,
    cauchy_regression,
    counterexample_quadratic,
    power_iteration,
    standard_problems,
    trace_power_bound,
)
from theory_strategies import problems

ROUNDING = 1e-12  # relative slack for comparing two float64 evaluations of the same quantity


def _points(p, rng, count=4):
    pts = [p.W0]
    if p.minimiser is not None:
        pts.append(p.minimiser)
    scale = p.ball.radius / math.sqrt(p.W0.size)
    pts += [scale * s * rng.standard_normal(p.shape) for s in (0.1, 1.0, 5.0)[: count]]
    return pts


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(0, 1000))
def test_beta_bounds_the_hessian_everywhere(p, seed):
    rng = np.random.default_rng(seed)
    for W in _points(p, rng):
        eig = np.linalg.eigvalsh(p.hessian(W))
        assert max(abs(eig[0]), abs(eig[-1])) <= p.beta


@settings(max_examples=20, deadline=None)
@given(problems(kinds=("squares",)))
def test_least_squares_constants_are_exact(p):
    eig = np.linalg.eigvalsh(p.hessian(p.W0))
    assert eig[-1] <= p.beta <= eig[-1] * (1 + 1e-8)  # tight: beta is the true constant
    assert eig[0] * (1 - 1e-8) <= p.mu <= eig[0]
    _, G = p.value_and_grad(p.minimiser)
    assert np.linalg.norm(G) <= 1e-8 * max(1.0, np.linalg.norm(p.X.T @ p.Y) / p.n)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert p.value(p.minimiser + 0.1 * rng.standard_normal(p.shape)) >= p.f_star


@settings(max_examples=20, deadline=None)
@given(problems(kinds=("softmax",)), st.integers(0, 1000))
def test_logistic_constants(p, seed):
    rng = np.random.default_rng(seed)
    for W in _points(p, rng):
        assert np.linalg.eigvalsh(p.hessian(W))[0] >= p.mu  # strongly convex => PL with mu
        assert p.value(W) >= p.f_star  # certified lower bound
    assert p.value(p.minimiser) - p.f_star <= 1e-10


@settings(max_examples=20, deadline=None)
@given(problems(kinds=("cauchy",)), st.integers(0, 1000))
def test_cauchy_lower_bound_zero(p, seed):
    rng = np.random.default_rng(seed)
    for W in _points(p, rng):
        assert p.value(W) >= p.f_star == 0.0


def test_cauchy_is_really_nonconvex():
    p = cauchy_regression(seed=0)
    W = 0.5 * p.ball.radius * np.random.default_rng(0).standard_normal(p.shape) / math.sqrt(p.W0.size)
    assert np.linalg.eigvalsh(p.hessian(W))[0] < 0


@settings(max_examples=25, deadline=None)
@given(problems(), st.integers(0, 1000))
def test_gradient_matches_finite_differences_and_torch(p, seed):
    rng = np.random.default_rng(seed)
    W = p.ball.radius * rng.standard_normal(p.shape) / math.sqrt(p.W0.size)
    f, G = p.value_and_grad(W)
    E = rng.standard_normal(p.shape)
    h = 1e-6
    fd = (p.value(W + h * E) - p.value(W - h * E)) / (2 * h)
    assert fd == pytest.approx(float(np.vdot(G, E)), rel=1e-5, abs=1e-7)
    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    loss = p.torch_loss(torch.as_tensor(p.X) @ Wt) + p.torch_reg(Wt)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(f, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(Wt.grad.numpy(), G, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(problems(), st.integers(0, 1000))
def test_minibatch_gradient_is_unbiased(p, seed):
    W = np.random.default_rng(seed).standard_normal(p.shape)
    G = p.grad(W)
    G_rows = np.mean([p.value_and_grad(W, np.array([i]))[1] for i in range(p.n)], axis=0)
    np.testing.assert_allclose(G_rows, G, rtol=1e-9, atol=1e-12)


def test_hessian_matches_autograd():
    for p in standard_problems(seed=3).values():
        W = 0.3 * np.random.default_rng(1).standard_normal(p.shape)

        def f(w):
            return p.torch_loss(torch.as_tensor(p.X) @ w) + p.torch_reg(w)

        H = torch.autograd.functional.hessian(f, torch.tensor(W, dtype=torch.float64)).numpy()
        d, k = p.shape
        np.testing.assert_allclose(p.hessian(W), H.reshape(d * k, d * k), rtol=1e-9, atol=1e-12)


def test_counterexample_hessian_is_diag_10_1():
    p = counterexample_quadratic(d=6, k=3)
    H = p.hessian(p.W0)
    per_column = np.diag(H).reshape(6, 3)[:, 0]
    np.testing.assert_allclose(per_column, [10, 1, 1, 1, 1, 1], rtol=1e-14)
    assert np.count_nonzero(H - np.diag(np.diag(H))) == 0
    assert p.f_star == 0.0 and p.value(p.minimiser) == pytest.approx(0.0, abs=1e-28)
    assert p.beta >= 10.0 and p.mu <= 1.0


@settings(max_examples=20, deadline=None)
@given(problems(kinds=("squares",)), st.integers(1, 6))
def test_low_rank_floor_is_the_rank_r_minimum(p, r):
    r = min(r, min(p.shape))
    floor = p.low_rank_floor(r)
    # attained by X^+ (X W_ls)_r (Eckart-Young in the metric of X)
    U, s, Vt = np.linalg.svd(p.X @ p.minimiser, full_matrices=False)
    W_r = np.linalg.lstsq(p.X, (U[:, :r] * s[:r]) @ Vt[:r], rcond=None)[0]
    assert p.value(W_r) == pytest.approx(floor, rel=1e-9, abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):  # no rank-r matrix does better
        W = rng.standard_normal((p.shape[0], r)) @ rng.standard_normal((r, p.shape[1]))
        assert p.value(W) >= floor * (1 - ROUNDING)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["nuclear", "frobenius"]), st.floats(0.1, 10.0), st.integers(0, 1000),
       st.integers(1, 6), st.integers(1, 6))
def test_ball_lmo_and_gap(norm, radius, seed, d, k):
    ball = Ball(norm, radius)
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((d, k))
    V = ball.lmo(G)
    assert ball.contains(V)
    assert float(np.vdot(V, G)) == pytest.approx(ball.lmo_value(G), rel=1e-12)
    for _ in range(10):  # nothing in K does better
        U = ball.along(rng.standard_normal((d, k))) * rng.uniform(0, 1)
        assert float(np.vdot(U, G)) >= ball.lmo_value(G) * (1 + ROUNDING)
    W = ball.along(rng.standard_normal((d, k))) * rng.uniform(0, 1)
    gap = ball.gap(G, W)
    assert gap >= 0
    if norm == "nuclear":  # the formula the issue states
        assert gap == pytest.approx(float(np.vdot(G, W)) + radius * np.linalg.norm(G, 2), rel=1e-12)
    assert gap == pytest.approx(float(np.vdot(G, W - V)), rel=1e-12)
    assert ball.diameter == 2 * radius


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(0, 1000), st.floats(1.0, 1e4))
def test_certified_lambda_max(dim, seed, cond):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eig = np.geomspace(1.0, 1.0 / cond, dim) * rng.uniform(0.1, 10)
    S = (Q * eig) @ Q.T
    true = eig.max()
    upper = trace_power_bound(S)
    assert true <= upper <= true * dim ** (1 / 2**10) * (1 + 1e-8)
    lower, _ = power_iteration(lambda v: S @ v, dim, iters=50, seed=seed)
    assert lower <= true * (1 + ROUNDING)


def test_standard_problems_are_seeded_and_cover_the_issue():
    a, b = standard_problems(seed=5), standard_problems(seed=5)
    for key in a:
        np.testing.assert_array_equal(a[key].X, b[key].X)
        assert a[key].constants() == b[key].constants()
    ranks = {key: p.info.get("target_rank") for key, p in a.items()}
    assert ranks["ls-low"] < 4 < ranks["ls-high"]  # target rank below and above the link rank
    for p in a.values():
        c = p.constants()
        assert c["M"] >= 0 and c["beta"] > 0 and c["K"]["diameter"] == 2 * c["K"]["radius"]
        assert p.ball.contains(p.W0)
