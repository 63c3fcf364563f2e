"""Each bound holds for the algorithm whose assumptions it states, on random problem instances."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cola_theory import bounds
from cola_theory.algorithms import (
    frank_wolfe,
    gaussian_projection,
    noisy_lmo,
    rac_expected_next_value,
    rac_projected_gd,
)
from cola_theory.problems import standard_problems

from theory_strategies import problems

ROUNDING = 1e-10  # relative slack for sums of float64 terms


def _proof_step_ok(p, T):
    """Theorem 4.1's step must be <= 1 for the iterates to stay in K."""
    return bounds.fw_step_size(p.M, p.beta, p.D, T) <= 1.0


# ------------------------------------------------------------------------------ COLA Theorem 4.1


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(1, 120))
def test_theorem_4_1_exact_linear_minimiser(p, T):
    assume(_proof_step_ok(p, T))
    traj = frank_wolfe(p, T)
    eps = max(0.0, float(traj.eps.max()))
    assert eps <= 1e-9 * max(1.0, abs(p.ball.lmo_value(p.grad(p.W0))))  # exact LMO: eps is rounding
    assert traj.mean_gap <= bounds.fw_gap_bound(p.M, p.beta, p.D, T, eps) * (1 + ROUNDING)
    assert p.ball.contains(traj.W)
    assert np.all(traj.gaps >= -1e-9)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(1, 80), st.floats(0.0, 1.0), st.integers(0, 100))
def test_theorem_4_1_inexact_linear_minimiser(p, T, mix, seed):
    assume(_proof_step_ok(p, T))
    traj = frank_wolfe(p, T, lmo=noisy_lmo(p, mix, seed))
    eps = float(traj.eps.max())
    assert eps >= -1e-9  # nothing in K beats the exact minimiser
    assert traj.mean_gap <= bounds.fw_gap_bound(p.M, p.beta, p.D, T, eps) * (1 + ROUNDING)
    assert p.ball.contains(traj.W)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 80), st.integers(1, 10), st.integers(0, 100))
def test_theorem_4_1_stochastic_minibatch(p, T, batch, seed):
    assume(_proof_step_ok(p, T))
    traj = frank_wolfe(p, T, batch_size=min(batch, p.n), seed=seed)
    eps = max(0.0, float(traj.eps.max()))
    assert traj.mean_gap <= bounds.fw_gap_bound(p.M, p.beta, p.D, T, eps) * (1 + ROUNDING)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 80), st.floats(1e-3, 1.0))
def test_proof_bound_holds_for_any_step(p, T, eta):
    traj = frank_wolfe(p, T, eta=eta)
    eps = max(0.0, float(traj.eps.max()))
    assert traj.mean_gap <= bounds.fw_gap_bound_for_step(p.M, p.beta, p.D, T, eta, eps) * (1 + ROUNDING)


@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(1e-2, 1e2), st.integers(1, 10_000), st.floats(0, 1))
def test_proof_step_gives_the_theorem_bound(M, beta, D, T, eps):
    """At eta = sqrt(2M/(beta D^2 T)) the proof gives sqrt(2) sqrt(M beta) D / sqrt(T) + eps, inside
    the theorem's 2 sqrt(M beta) D / sqrt(T) + eps; and that eta minimises the proof's bound."""
    eta = bounds.fw_step_size(M, beta, D, T)
    at_eta = bounds.fw_gap_bound_for_step(M, beta, D, T, eta, eps)
    assert at_eta == pytest.approx(math.sqrt(2 * M * beta) * D / math.sqrt(T) + eps, rel=1e-12)
    assert at_eta <= bounds.fw_gap_bound(M, beta, D, T, eps)
    for other in (0.5 * eta, 0.9 * eta, 1.1 * eta, 2.0 * eta):
        assert bounds.fw_gap_bound_for_step(M, beta, D, T, other, eps) >= at_eta * (1 - 1e-12)


# ------------------------------------------------------------------------------ RAC-LoRA


@settings(max_examples=50, deadline=None)
@given(problems(), st.integers(1, 6), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_rac_descent_is_pathwise(p, rank, c, p_train_a, seed):
    """gamma <= 1/beta and H a projection: f(W_t+1) <= f(W_t) - gamma (1 - beta gamma/2) <g, H g>."""
    gamma = c / p.beta
    traj = rac_projected_gd(p, 40, rank, gamma=gamma, p_train_a=p_train_a, seed=seed)
    decrease = traj.losses[:-1] - traj.losses[1:]
    guaranteed = gamma * (1 - p.beta * gamma / 2) * traj.extra["quad"]
    assert np.all(decrease >= guaranteed - ROUNDING * np.abs(traj.losses[:-1]) - 1e-14)
    assert 0.5 * gamma * traj.extra["quad"].sum() <= (p.value(p.W0) - p.f_star) * (1 + ROUNDING) + 1e-14


@settings(max_examples=100, deadline=None)
@given(problems(kinds=("squares",)), st.integers(1, 8), st.floats(0.05, 1.0), st.floats(0.0, 1.0),
       st.floats(0.0, 3.0), st.integers(0, 1000))
def test_rac_one_step_in_expectation_exactly(p, rank, c, p_train_a, spread, seed):
    """The cores of both RAC-LoRA theorems, with the exact expectation over sketches:
    E f(W') <= f(W) - (gamma lambda / 2) ||grad||^2 and E f(W') - f* <= (1 - gamma mu lambda)(f(W) - f*)."""
    d, k = p.shape
    gamma = c / p.beta
    lam = bounds.rac_lambda_gaussian(rank, d, k, p_train_a)
    W = p.minimiser + spread * np.random.default_rng(seed).standard_normal(p.shape)
    f, G = p.value_and_grad(W)
    expected = rac_expected_next_value(p, W, rank, gamma, p_train_a)
    slack = ROUNDING * abs(f) + 1e-14
    assert expected <= f - 0.5 * gamma * lam * float(np.sum(G * G)) + slack
    assert expected - p.f_star <= (1 - gamma * p.mu * lam) * (f - p.f_star) + slack


def test_rac_expected_value_matches_monte_carlo():
    p = standard_problems(seed=2)["ls-low"]
    W = 0.2 * np.random.default_rng(0).standard_normal(p.shape)
    gamma, rank, p_a = 1.0 / p.beta, 3, 0.3
    rng = np.random.default_rng(1)
    G = p.grad(W)
    d, k = p.shape
    vals = np.array([
        p.value(W - gamma * (G @ gaussian_projection(rng, k, rank) if rng.random() < p_a
                             else gaussian_projection(rng, d, rank) @ G))
        for _ in range(4000)
    ])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean() - rac_expected_next_value(p, W, rank, gamma, p_a)) <= 4 * se


@settings(max_examples=10, deadline=None)
@given(problems(kinds=("squares", "cauchy")), st.integers(1, 4), st.integers(0, 100))
def test_rac_nonconvex_bound_monte_carlo(p, rank, seed):
    """min_t E||grad f(W_t)||^2 <= 2 (f(W0) - f*) / (lambda gamma T), E over 16 sketch seeds."""
    T = 60
    runs = [rac_projected_gd(p, T, rank, seed=seed * 100 + s) for s in range(16)]
    mean_sq = np.mean([r.grad_sq[:T] for r in runs], axis=0)
    bound = bounds.rac_nonconvex_bound(p.value(p.W0) - p.f_star, runs[0].extra["lambda"], runs[0].step, T)
    assert mean_sq.min() <= bound


@pytest.mark.parametrize("key", ["ls-low", "logistic", "quadratic"])
def test_rac_pl_bound_monte_carlo(key):
    """E f(W_t) - f* <= (1 - gamma mu lambda)^t (f(W0) - f*) for every t, E over 32 sketch seeds."""
    p = standard_problems(seed=1)[key]
    T = 100
    runs = [rac_projected_gd(p, T, 2, seed=s) for s in range(32)]
    gap = np.mean([r.losses for r in runs], axis=0) - p.f_star
    lam, gamma = runs[0].extra["lambda"], runs[0].step
    curve = np.array([bounds.rac_pl_bound(gap[0], lam, gamma, p.mu, t) for t in range(T + 1)])
    assert np.all(gap <= curve * (1 + ROUNDING))


def test_rac_lambda_is_lambda_min_of_expected_projection():
    rng = np.random.default_rng(0)
    for dim, rank in [(6, 1), (6, 2), (5, 5), (4, 7)]:
        mean = np.mean([gaussian_projection(rng, dim, rank) for _ in range(4000)], axis=0)
        np.testing.assert_allclose(mean, min(1.0, rank / dim) * np.eye(dim), atol=0.03)
    assert bounds.rac_lambda_gaussian(2, 8, 8) == pytest.approx(0.25)
    assert bounds.rac_lambda_gaussian(2, 8, 4, p_train_a=1.0) == pytest.approx(0.5)
    assert bounds.rac_lambda_gaussian(2, 8, 4, p_train_a=0.0) == pytest.approx(0.25)


@given(st.floats(-2.0, -0.1), st.floats(0.01, 100.0))
def test_fit_rate_exponent_recovers_a_power_law(slope, scale):
    Ts = [10, 20, 40, 80, 160]
    fitted, stderr = bounds.fit_rate_exponent(Ts, [scale * T**slope for T in Ts])
    assert fitted == pytest.approx(slope, abs=1e-9)
    assert stderr < 1e-9
