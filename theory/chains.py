"""The same algorithms run through the real ``cola.Chain`` (public API only).

The matrix variable W (d x k) lives in a tiny module as ``nn.Linear(d, k, bias=False)``
(weight = W^T), so ``model(X) = X W`` is the problem's loss input and ``model(I) = W``.
``cola.inject_lora`` wraps that Linear; ``cola.Chain`` trains, merges and re-initialises the
links. Everything is float64 on CPU; losses are recomputed in numpy from the effective W.

- :func:`train_chain`: the practical chain (LoRA = one link, COLA = several) with SGD or Adam.
- :func:`train_full`: the full-update baseline with the same optimizer.
- :func:`chain_frank_wolfe`: the eps-inexact idealised COLA whose linear minimiser is one
  rank-r LoRA link trained by the chain; the eps it achieves is measured.
- :func:`rac_chain`: RAC-LoRA through the chain with the ``rac`` re-init strategy and
  :class:`SketchedGD`, which makes each link the projected-GD step of the theory.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

import cola

from .algorithms import Trajectory
from .bounds import fw_step_size, rac_lambda_gaussian
from .problems import Problem

__all__ = [
    "MatrixModel",
    "ChainRun",
    "lora_model",
    "train_chain",
    "train_full",
    "chain_frank_wolfe",
    "SketchedGD",
    "rac_chain",
]

log = logging.getLogger(__name__)

DTYPE = torch.float64


class MatrixModel(nn.Module):
    """W (d x k) held as ``nn.Linear(d, k, bias=False)``; ``forward(x) = scale * x @ W``."""

    def __init__(self, W0: np.ndarray):
        super().__init__()
        d, k = W0.shape
        self.linear = nn.Linear(d, k, bias=False, dtype=DTYPE)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(W0.T, dtype=DTYPE))
        self.scale = 1.0
        self.register_buffer("eye", torch.eye(d, dtype=DTYPE), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.scale == 1.0 else self.scale * out

    def matrix(self) -> np.ndarray:
        """The effective W (base weight plus the live LoRA link), without ``scale``."""
        with torch.no_grad():
            return self.linear(self.eye).numpy().copy()


@dataclasses.dataclass
class ChainRun:
    """A run through ``cola.Chain``: the trajectory plus the chain's knot reports."""

    trajectory: Trajectory
    history: list = dataclasses.field(default_factory=list)  # KnotReport.to_dict() per knot
    label: str = ""


def lora_model(W0: np.ndarray, rank: int, alpha: float | None = None) -> tuple[MatrixModel, cola.LoRALinear]:
    """A :class:`MatrixModel` with its Linear wrapped by ``cola.inject_lora`` (float64 factors).

    ``alpha`` defaults to 2 * rank: the paper's scaling alpha / r = 16 / 8 = 2.
    """
    model = MatrixModel(W0)
    cola.inject_lora(model, target_modules=["linear"], rank=rank,
                     alpha=float(2 * rank if alpha is None else alpha), lora_dtype=DTYPE)
    return model, cola.lora_layers(model)["linear"]


def _objective(problem: Problem, model: MatrixModel, X: torch.Tensor) -> torch.Tensor:
    """f at the model's W (times ``model.scale``), with the problem's L2 term."""
    loss = problem.torch_loss(model(X))
    if problem.reg:
        loss = loss + problem.torch_reg(model(model.eye))
    return loss


def _optimizer_factory(name: str, lr: float) -> Callable:
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def _record(problem: Problem, W: np.ndarray, losses: list, grad_sq: list) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        f, G = problem.value_and_grad(W)
        losses.append(f)
        grad_sq.append(float(np.sum(G * G)))


def _run_steps(problem: Problem, model: MatrixModel, chain: cola.Chain, X: torch.Tensor, steps: int,
               losses: list, grad_sq: list) -> int | None:
    """Full-batch chain steps, recording f after each; returns the step of a divergence (or None).

    A divergence is a step the chain skipped as non-finite (``Chain.step`` returns a false verdict), a
    knot it refused as non-finite (``cola.NonFiniteMergeError``), or a non-finite f: the run
    stops there, with NaN recorded for that step.
    """
    for _ in range(steps):
        loss = _objective(problem, model, X)
        chain.zero_grad()
        loss.backward()
        try:
            taken = chain.step(loss.detach())
        except cola.NonFiniteMergeError as err:
            log.info("%s: %s", problem.name, err)
            taken = False
        if not taken:
            losses.append(float("nan"))
            grad_sq.append(float("nan"))
            return len(losses) - 1
        _record(problem, model.matrix(), losses, grad_sq)
        if not np.isfinite(losses[-1]):
            return len(losses) - 1
    return None


def train_chain(
    problem: Problem,
    total_steps: int,
    links: int,
    rank: int,
    optimizer: Literal["sgd", "adam"] = "adam",
    lr: float = 1e-2,
    alpha: float | None = None,
    reinit: str = "lora",
    reinit_options: dict | None = None,
    seed: int = 0,
    optimizer_factory: Callable | None = None,
) -> ChainRun:
    """The practical chain: ``links`` even links of rank-``rank`` LoRA over ``total_steps``
    full-batch steps (``links=1`` is plain LoRA). Records f(W_t) after every step."""
    torch.manual_seed(seed)
    model, _ = lora_model(problem.W0, rank, alpha)
    config = cola.ChainConfig(
        total_steps=total_steps, links=links, reinit=reinit, reinit_options=dict(reinit_options or {}),
        seed=seed, diagnostics=links <= 10,
    )
    chain = cola.Chain(model, optimizer_factory or _optimizer_factory(optimizer, lr), config)
    X = torch.as_tensor(problem.X, dtype=DTYPE)
    losses, grad_sq = [], []
    _record(problem, model.matrix(), losses, grad_sq)
    diverged = _run_steps(problem, model, chain, X, total_steps, losses, grad_sq)
    traj = Trajectory(losses=np.array(losses), grad_sq=np.array(grad_sq), W=model.matrix(), step=lr,
                      extra={"diverged_at": diverged})
    label = "LoRA" if links == 1 else f"COLA, {links} links"
    return ChainRun(traj, [r.to_dict() for r in chain.history], label)


def train_full(
    problem: Problem,
    total_steps: int,
    optimizer: Literal["sgd", "adam"] = "adam",
    lr: float = 1e-2,
    seed: int = 0,
) -> ChainRun:
    """The full-update baseline: the same optimizer on W itself (no LoRA, no chain)."""
    torch.manual_seed(seed)
    model = MatrixModel(problem.W0)
    opt = _optimizer_factory(optimizer, lr)(list(model.parameters()))
    X = torch.as_tensor(problem.X, dtype=DTYPE)
    losses, grad_sq = [], []
    _record(problem, model.matrix(), losses, grad_sq)
    for _ in range(total_steps):
        loss = _objective(problem, model, X)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _record(problem, model.matrix(), losses, grad_sq)
    traj = Trajectory(losses=np.array(losses), grad_sq=np.array(grad_sq), W=model.matrix(), step=lr)
    return ChainRun(traj, [], "full update")


def chain_frank_wolfe(
    problem: Problem,
    T: int,
    rank: int,
    inner_steps: int = 5,
    lr: float = 0.5,
    objective: Literal["linear", "loss"] = "linear",
    eta: float | None = None,
    seed: int = 0,
) -> ChainRun:
    """Idealised COLA with an eps-inexact linear minimiser: each link is a rank-r LoRA.

    Link t trains ``inner_steps`` SGD steps of a fresh LoRA link Delta on the linearisation
    <Delta, grad f(W_t)> / ||grad f(W_t)||_F (``objective="linear"``, the linear minimiser's own
    objective) or on f(W_t + Delta) (``"loss"``). V_t is the point of K along Delta
    (R Delta / ||Delta||), so V_t lies in K and eps_t = <V_t, G_t> - min_K <V, G_t> is measured.

    The Frank-Wolfe step W_{t+1} = (1 - eta) W_t + eta V_t is kept as a chain of links: the
    merged weight Z holds W_t / c_t with c_t = (1 - eta)^(t-1), so a step is Z += kappa Delta
    with kappa = eta R / ((1 - eta) c_t ||Delta||): the live link is scaled by kappa, then the
    chain ties the knot. The model computes c_t * X (Z + Delta), i.e. f at W_t + c_t Delta.
    """
    ball = problem.ball
    if eta is None:
        eta = fw_step_size(problem.M, problem.beta, ball.diameter, T)
    if not 0.0 < eta < 1.0:
        raise ValueError(f"chain_frank_wolfe needs a step in (0, 1), got eta={eta:g}")
    torch.manual_seed(seed)
    model, layer = lora_model(problem.W0, rank, alpha=rank)
    config = cola.ChainConfig(total_steps=T * inner_steps, links=1, seed=seed)
    chain = cola.Chain(model, _optimizer_factory("sgd", lr), config)
    X = torch.as_tensor(problem.X, dtype=DTYPE)
    c = 1.0
    W_ref = problem.W0.copy()  # the same recursion in numpy, as a cross-check of the chain
    losses, grad_sq, gaps, eps = [], [], [], []
    for t in range(T):
        Z = model.matrix()
        W = c * Z
        f, G = problem.value_and_grad(W)
        losses.append(f)
        grad_sq.append(float(np.sum(G * G)))
        gaps.append(ball.gap(G, W))
        gnorm = max(float(np.linalg.norm(G)), 1e-300)
        G_t = torch.as_tensor(G / gnorm, dtype=DTYPE)
        model.scale = c
        for _ in range(inner_steps):
            if objective == "linear":
                loss = (model.linear(model.eye) * G_t).sum()
            else:  # f(W_t + c Delta) / (c ||G_t||): the same gradient at Delta = 0 as "linear"
                loss = _objective(problem, model, X) / (c * gnorm)
            chain.zero_grad()
            loss.backward()
            chain.step(loss.detach())
        delta = model.matrix() - Z
        if not np.all(np.isfinite(delta)):
            raise FloatingPointError(f"link {t} of {problem.name} diverged (lr={lr:g}): lower the lr")
        V = ball.along(delta)
        eps.append(float(np.vdot(V, G)) - ball.lmo_value(G))
        W_ref = (1.0 - eta) * W_ref + eta * V
        size = ball.norm_of(delta)
        kappa = eta * ball.radius / ((1.0 - eta) * c * size) if size > 0 else 0.0
        with torch.no_grad():
            layer.lora_B.mul_(kappa)
        chain.tie_knot()
        c *= 1.0 - eta
    W = c * model.matrix()
    _record(problem, W, losses, grad_sq)
    traj = Trajectory(
        losses=np.array(losses), grad_sq=np.array(grad_sq), gaps=np.array(gaps), eps=np.array(eps),
        W=W, step=eta,
        extra={"recursion_error": float(np.linalg.norm(W - W_ref)), "inner_steps": inner_steps,
               "objective": objective, "rank": rank},
    )
    return ChainRun(traj, [r.to_dict() for r in chain.history], f"COLA-FW (rank-{rank} links)")


class SketchedGD(torch.optim.Optimizer):
    """GD on the trainable factor of a RAC-LoRA link, preconditioned so that each step is the
    projected-GD step W <- W - lr H grad f(W) with H the projection onto the frozen factor's
    range: A <- A - lr (B^T B)^+ grad_A / s^2 (B frozen), B <- B - lr grad_B (A A^T)^+ / s^2.
    """

    def __init__(self, params, lr: float, layers: list):
        super().__init__(params, {"lr": lr})
        self.layers = layers

    @torch.no_grad()
    def step(self, closure=None):
        lr = self.param_groups[0]["lr"]
        for layer in self.layers:
            A, B, s2 = layer.lora_A, layer.lora_B, layer.scaling ** 2
            if A.requires_grad and A.grad is not None:
                A.sub_(lr / s2 * torch.linalg.pinv(B.T @ B) @ A.grad)
            if B.requires_grad and B.grad is not None:
                B.sub_(lr / s2 * B.grad @ torch.linalg.pinv(A @ A.T))
        return None


def rac_chain(
    problem: Problem,
    T: int,
    rank: int,
    gamma: float | None = None,
    p_train_a: float = 0.5,
    train: Literal["bernoulli", "A", "B"] = "bernoulli",
    link_steps: int = 1,
    preconditioned: bool = True,
    seed: int = 0,
) -> ChainRun:
    """RAC-LoRA through ``cola.Chain``: re-init ``rac`` (random frozen factor, the other trained
    from zero) with a Bernoulli(``p_train_a``) side, a knot every ``link_steps`` steps.

    With ``preconditioned`` (default) the optimizer is :class:`SketchedGD`, so every step is
    exactly the theory's projected-GD step with step ``gamma`` (default 1/beta); without it,
    plain SGD on the trainable factor (the update is then -gamma s^2 B B^T grad, not a projection).
    ``train="A"`` with ``link_steps=T`` is asymmetric LoRA (one fixed random B, never re-drawn).
    """
    gamma = 1.0 / problem.beta if gamma is None else gamma
    d, k = problem.shape
    torch.manual_seed(seed)
    model, layer = lora_model(problem.W0, rank, alpha=rank)
    config = cola.ChainConfig(
        total_steps=T, merge_policy="every", merge_policy_options={"every": link_steps},
        reinit="rac", reinit_options={"train": train, "p": p_train_a}, seed=seed,
    )
    if preconditioned:
        factory = lambda params: SketchedGD(params, gamma, [layer])  # noqa: E731
    else:
        factory = _optimizer_factory("sgd", gamma)
    chain = cola.Chain(model, factory, config)
    X = torch.as_tensor(problem.X, dtype=DTYPE)
    losses, grad_sq = [], []
    _record(problem, model.matrix(), losses, grad_sq)
    diverged = _run_steps(problem, model, chain, X, T, losses, grad_sq)
    traj = Trajectory(
        losses=np.array(losses), grad_sq=np.array(grad_sq), W=model.matrix(), step=gamma,
        extra={"diverged_at": diverged,
               "lambda": rac_lambda_gaussian(rank, d, k, {"A": 1.0, "B": 0.0}.get(train, p_train_a))},
    )
    label = "RAC-LoRA" if link_steps < T else f"asymmetric LoRA (train {train})"
    label += "" if preconditioned else ", plain SGD"
    return ChainRun(traj, [r.to_dict() for r in chain.history], label)
