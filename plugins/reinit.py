"""Re-init strategies: how a new link starts. Each leaves the layer's function unchanged."""

from __future__ import annotations

import math

import torch

import cola
from cola import ConfigError

from ._options import fraction
from .frank_wolfe import FrankWolfeInit


def _uniform(shape, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoRAInit:
    """A ~ kaiming_uniform(a=sqrt(5)) (i.e. U(-1/sqrt(in), 1/sqrt(in))), B = 0: LoRA's own init."""

    def __init__(self, config):
        pass

    def reinit(self, layer, rank, info) -> None:
        A = _uniform((rank, layer.in_features), 1.0 / math.sqrt(layer.in_features), info.generator)
        layer.set_factors_(A, torch.zeros(layer.out_features, rank))


class GaussianInit:
    """A ~ N(0, std^2) (default std = 1/rank, as PEFT's "gaussian"), B = 0."""

    def __init__(self, config, std=None):
        if std is not None and (not isinstance(std, (int, float)) or std <= 0):
            raise ConfigError(f"std={std!r}: must be a number > 0")
        self.std = std

    def reinit(self, layer, rank, info) -> None:
        std = self.std if self.std is not None else 1.0 / rank
        A = torch.randn((rank, layer.in_features), generator=info.generator) * std
        layer.set_factors_(A, torch.zeros(layer.out_features, rank))


class PiSSAInit:
    """A, B from the top-r singular triplets of the current merged weight, folded out of it.

    ``scaling * B @ A = U_r S_r V_r^T`` and the base weight loses exactly that, so the layer's
    function is unchanged. ``niter`` > 0 uses a randomised SVD with that many power iterations.
    """

    def __init__(self, config, niter=0):
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ConfigError(f"niter={niter!r}: must be an integer >= 0 (0 = exact SVD)")
        self.niter = niter

    def reinit(self, layer, rank, info) -> None:
        W = layer.exact_weight()
        if self.niter:
            U, S, V = torch.svd_lowrank(W, q=min(rank + 8, min(W.shape)), niter=self.niter)
            Vh = V.T
        else:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        layer.set_factors_(torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank))
        root = torch.sqrt(S / layer.scaling)
        A, B = root[:, None] * Vh, U * root[None, :]
        dtype = layer.lora_A.dtype  # fold out exactly what the factors will hold (rounded to their dtype)
        A, B = A.to(dtype).float(), B.to(dtype).float()
        layer.fold_(B, A, -layer.scaling)
        layer.set_factors_(A, B)


class RACInit:
    """RAC-LoRA: one factor random (Gaussian, std ``std``) and frozen, the other zero and trained.

    ``train="A"`` freezes a random B and trains A; ``train="B"`` the mirror; ``train="bernoulli"``
    draws the side per link (the same for every layer): A with probability ``p`` (Bernoulli-LoRA).
    """

    def __init__(self, config, train="A", p=0.5, std=None):
        if train not in ("A", "B", "bernoulli"):
            raise ConfigError(f"train={train!r}: allowed A, B, bernoulli")
        self.train, self.p = train, fraction("p", p)
        if std is not None and (not isinstance(std, (int, float)) or std <= 0):
            raise ConfigError(f"std={std!r}: must be a number > 0")
        self.std = std
        self.sides: dict[int, str] = {}

    def side(self, info) -> str:
        if self.train != "bernoulli":
            return self.train
        if info.link not in self.sides:
            self.sides[info.link] = "A" if float(torch.rand((), generator=info.generator)) < self.p else "B"
        return self.sides[info.link]

    def reinit(self, layer, rank, info) -> None:
        std = self.std if self.std is not None else 1.0 / math.sqrt(rank)
        if self.side(info) == "A":
            B = torch.randn((layer.out_features, rank), generator=info.generator) * std
            layer.set_factors_(torch.zeros(rank, layer.in_features), B, train_A=True, train_B=False)
        else:
            A = torch.randn((rank, layer.in_features), generator=info.generator) * std
            layer.set_factors_(A, torch.zeros(layer.out_features, rank), train_A=False, train_B=True)

    def state_dict(self) -> dict:
        return {"sides": dict(self.sides)}

    def load_state_dict(self, state: dict) -> None:
        self.sides = {int(k): v for k, v in state["sides"].items()}


class OrthogonalInit:
    """A with orthogonal rows, orthogonal to the row spaces of the links already folded; B = 0.

    Rows are scaled to the expected norm of LoRA's kaiming-uniform rows. When the previous
    links fill the input space, only their top ``in - rank`` directions are avoided.
    Needs ``record_links`` (the default).
    """

    def __init__(self, config):
        if not config.record_links:
            raise ConfigError("reinit 'orthogonal' needs record_links=True to see the previous links")

    def reinit(self, layer, rank, info) -> None:
        n = layer.in_features
        G = torch.randn((rank, n), generator=info.generator, dtype=torch.float64)
        if layer.links:
            M = torch.cat([a.double() for _, a, _ in layer.links], dim=0)
            _, S, Vh = torch.linalg.svd(M, full_matrices=False)
            keep = min(int((S > S.max() * 1e-10).sum()), n - rank)
            basis = Vh[:keep]
            G = G - (G @ basis.T) @ basis
        Q, _ = torch.linalg.qr(G.T)
        A = (Q.T * math.sqrt(1.0 / 3.0)).float()
        layer.set_factors_(A, torch.zeros(layer.out_features, rank))


@cola.hookimpl
def cola_register_reinit_strategies(register):
    register("lora", LoRAInit)
    register("gaussian", GaussianInit)
    register("pissa", PiSSAInit)
    register("rac", RACInit)
    register("orthogonal", OrthogonalInit)
    register("fw", FrankWolfeInit)
