"""The algorithms run through the real cola.Chain do what the theory says they do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cola
from cola_theory import bounds
from cola_theory.algorithms import frank_wolfe
from cola_theory.chains import SketchedGD, chain_frank_wolfe, lora_model, rac_chain, train_chain, train_full
from cola_theory.problems import counterexample_quadratic, least_squares, standard_problems


@pytest.fixture(scope="module")
def probs():
    return standard_problems(seed=0)


def test_matrix_model_is_the_problem(probs):
    p = probs["logistic"]
    W = np.random.default_rng(0).standard_normal(p.shape)
    model, layer = lora_model(W, rank=2)
    np.testing.assert_allclose(model.matrix(), W, rtol=0, atol=1e-15)
    with torch.no_grad():
        Z = model(torch.as_tensor(p.X))
    np.testing.assert_allclose(Z.numpy(), p.X @ W, rtol=1e-13, atol=1e-13)
    assert isinstance(layer, cola.LoRALinear) and layer.lora_A.dtype == torch.float64


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 4), st.sampled_from(["linear", "loss"]), st.integers(1, 6))
def test_chain_frank_wolfe_is_frank_wolfe_with_measured_eps(seed, rank, objective, inner):
    """The chain's links, rescaled at each knot, reproduce W_t+1 = W_t + eta (V_t - W_t) exactly;
    V_t lies in K (eps >= 0) and Theorem 4.1 holds with the eps measured."""
    p = least_squares(n=30, d=6, k=5, target_rank=4, seed=seed)
    T = 15
    run = chain_frank_wolfe(p, T, rank, inner_steps=inner, lr=1.0, objective=objective, seed=seed)
    traj = run.trajectory
    assert traj.extra["recursion_error"] <= 1e-10 * p.ball.radius
    assert np.all(traj.eps >= -1e-9)
    assert traj.mean_gap <= bounds.fw_gap_bound(p.M, p.beta, p.D, T, float(traj.eps.max()))
    assert p.ball.contains(traj.W)
    assert len(run.history) == T  # one knot per link


def test_more_inner_steps_make_a_better_linear_minimiser(probs):
    p = probs["ls-high"]
    few = chain_frank_wolfe(p, 20, 4, inner_steps=2, lr=1.0).trajectory
    many = chain_frank_wolfe(p, 20, 4, inner_steps=20, lr=1.0).trajectory
    assert many.eps.mean() < few.eps.mean()
    exact = frank_wolfe(p, 20)
    assert exact.eps.max() < 1e-9 < many.eps.mean()


def test_sketched_gd_step_is_the_projected_gradient_step(probs):
    p = probs["ls-high"]
    for train, seed in (("A", 0), ("B", 1)):
        model, layer = lora_model(p.W0 + 0.1, rank=3)
        gamma = 1.0 / p.beta
        config = cola.ChainConfig(total_steps=2, links=1, reinit="rac", reinit_options={"train": train}, seed=seed)
        chain = cola.Chain(model, lambda params: SketchedGD(params, gamma, [layer]), config)
        W = model.matrix()
        G = p.grad(W)
        if train == "A":  # frozen B (out x r): the update lives in range(B) of R^k
            B = layer.lora_B.detach().numpy()
            expected = W - gamma * G @ (B @ np.linalg.pinv(B))
        else:  # frozen A (r x in): range(A^T) of R^d
            A = layer.lora_A.detach().numpy()
            expected = W - gamma * (np.linalg.pinv(A) @ A) @ G
        loss = p.torch_loss(model(torch.as_tensor(p.X)))
        chain.zero_grad()
        loss.backward()
        chain.step(loss.detach())
        np.testing.assert_allclose(model.matrix(), expected, rtol=1e-9, atol=1e-11)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 3))
def test_rac_chain_descends_every_step(seed, rank):
    """With gamma <= 1/beta each RAC-LoRA link is a projected-GD step: f never increases."""
    p = least_squares(n=30, d=6, k=5, target_rank=4, seed=seed)
    traj = rac_chain(p, 40, rank, seed=seed).trajectory
    assert np.all(np.diff(traj.losses) <= 1e-12 * traj.losses[:-1])
    assert traj.extra["diverged_at"] is None


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 3), st.sampled_from(["sgd", "adam"]))
def test_lora_never_beats_its_rank_floor_and_cola_can(seed, rank, optimizer):
    p = least_squares(n=40, d=8, k=6, target_rank=6, noise=0.1, seed=seed)
    lr = 0.1 if optimizer == "sgd" else 0.05
    floor = p.low_rank_floor(rank)
    lora = train_chain(p, 150, 1, rank, optimizer=optimizer, lr=lr, seed=seed).trajectory
    assert np.nanmin(lora.losses) >= floor * (1 - 1e-12)
    cola_run = train_chain(p, 150, 5, rank, optimizer=optimizer, lr=lr, seed=seed)
    assert cola_run.trajectory.extra["diverged_at"] is None
    # the accumulated update has rank above r (the point of the chain)
    W = cola_run.trajectory.W
    assert np.linalg.matrix_rank(W, tol=1e-8 * np.linalg.norm(W)) > rank


def test_practical_chain_records_diagnostics(probs):
    run = train_chain(probs["ls-high"], 60, 3, 4, seed=0)
    assert [h["link"] for h in run.history] == [0, 1]
    assert all(h["effective_rank"]["linear"] > 0 and h["grad_norm"] is not None for h in run.history)
    full = train_full(probs["ls-high"], 60, seed=0)
    assert full.trajectory.losses[-1] < full.trajectory.losses[0]


def test_counterexample_lora_diverges_at_one_over_L_where_rac_converges():
    p = counterexample_quadratic(seed=4)
    lr = 1.0 / p.beta
    lora = train_chain(p, 100, 1, 2, optimizer="sgd", lr=lr).trajectory
    assert lora.extra["diverged_at"] is not None  # the chain refused a non-finite knot, or f blew up
    asym = rac_chain(p, 100, 2, train="A", link_steps=100).trajectory
    assert asym.losses[-1] >= p.low_rank_floor(2)  # one fixed sketch: stuck in a rank-2 subspace
    rac = rac_chain(p, 100, 2).trajectory
    assert rac.losses[-1] < 1e-2 * rac.losses[0]
