"""The Frank-Wolfe re-init ``fw``: each new link starts in the top singular subspace of the gradient.

In Frank-Wolfe the new direction is the linear minimisation oracle: for a nuclear-norm ball the
top singular pairs of the negative gradient with respect to the full weight. A link that starts
at ``B = 0`` with a random ``A`` (the ``lora`` re-init) spends its first steps finding that
direction; this re-init hands it over at the knot.

At a knot (:meth:`FrankWolfeInit.prepare`, once for all layers) the gradient ``G = dL/dW`` of
every adapted layer is sketched on the knot's batch without ever forming it, by a randomised
SVD whose products with ``G`` come out of the LoRA factors' own gradients (``dL/dB = s G A^T`` and
``dL/dA = s B^T G``):

1. ``A = Omega^T`` (Gaussian, ``k = r + oversample`` rows), ``B = 0``: one backward gives ``Y = G Omega``;
2. ``Q = qr(Y)``; with ``niter`` power iterations ``Q <- qr(G G^T Q)`` (two backwards each);
3. ``B = Q``, ``A = 0``: one backward gives ``Q^T G``, whose SVD gives the top-``r`` triplets.

Either factor being zero keeps the layer's function unchanged during the probes, and no d x d
matrix is kept (the largest is ``k x in``). The cost is ``2 + 2 niter`` forward-backward passes
per knot. Then each layer's new link starts there:

* ``init="A"`` (default): ``A`` = the top-``r`` right singular vectors (rows scaled to LoRA's
  expected row norm), ``B = 0``: the link's first steps move ``B`` straight along ``-G``'s top
  left singular vectors;
* ``init="both"`` (LoRA-GA-like): also ``B = -U_r`` (scaled by ``scale``), so that ``s B A`` is a
  step along ``-G``'s top-``r`` subspace; what it puts into the factors is folded out of the
  weight, so the function does not change at the knot.

The first link has no gradient yet (and a chain stepped without a ``closure`` has none at any
knot): it starts as the ``lora`` re-init does (A ~ kaiming-uniform, B = 0), and a warning says so
once when a later link does.
"""

from __future__ import annotations

import logging
import math

import torch

from cola import ConfigError

log = logging.getLogger(__name__)

INITS = ("A", "both")
_ROW_NORM = math.sqrt(1.0 / 3.0)  # the expected row norm of LoRA's kaiming-uniform A


def _lora_a(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand((rank, in_features), generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _sharded(param: torch.Tensor) -> bool:
    """An FSDP shard (a ``DTensor``: it has ``full_tensor``), told without importing torch.distributed."""
    return hasattr(param, "full_tensor")


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    g = param.grad
    return torch.zeros_like(param, dtype=torch.float32) if g is None else g.detach().float()


class _NonFinite(Exception):
    """A probe's gradient is not finite (the knot fell on a step with a non-finite loss or gradient)."""


def _finite(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``grads``, after one read of whether all of them are finite (raises :class:`_NonFinite` if not)."""
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
        raise _NonFinite
    return grads


class FrankWolfeInit:
    """Start each new link in the top-r singular subspace of the knot batch's full-weight gradient."""

    def __init__(self, config, init="A", oversample=8, niter=0, scale=None):
        if init not in INITS:
            raise ConfigError(f"init={init!r}: allowed {', '.join(INITS)}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ConfigError(f"oversample={oversample!r}: must be an integer >= 0")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ConfigError(f"niter={niter!r}: must be an integer >= 0")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale < math.inf):
            raise ConfigError(f"scale={scale!r}: must be a number > 0 (the norm of B's columns with init='both')")
        self.init, self.oversample, self.niter = init, oversample, niter
        self.scale = float(scale) if scale is not None else _ROW_NORM
        self.subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned = False

    @property
    def probe_passes(self) -> int:
        """Forward-backward passes this re-init adds at every knot (for compute accounting)."""
        return 2 + 2 * self.niter

    # ------------------------------------------------------------------ the probe
    def prepare(self, layers, ranks, info) -> None:
        """Sketch every layer's gradient on the knot's batch (``info.closure``); keep the top-r subspaces.

        Refused at once (``prepare`` of link 0 runs when the chain is built, before anything is trained or
        written) when FSDP shards the LoRA factors: the probe needs factors of rank r + oversample and whole
        gradients, and a sharded factor's rank cannot change."""
        self.subspaces = {}
        sharded = [n for n, layer in layers.items() if _sharded(layer.lora_A) or _sharded(layer.lora_B)]
        if sharded:
            raise ConfigError(f"reinit 'fw' cannot probe LoRA factors that FSDP shards ({len(sharded)} layers, such "
                              f"as {sharded[0]}): its sketch sets factors of rank r + oversample and reads whole "
                              "gradients. Keep the factors replicated (cola.distributed.fsdp(model) without "
                              "shard_lora, as cola train --fsdp does); nothing was changed")
        if info.closure is None:
            if info.link > 0 and not self._warned:
                log.warning("reinit 'fw': chain.step was given no closure, so there is no gradient to start "
                            "link %d from: it starts as 'lora' does (pass closure= to Chain.step)", info.link)
                self._warned = True
            return
        width = {n: min(ranks[n] + self.oversample, layer.max_rank) for n, layer in layers.items()}
        omega = {n: torch.randn((width[n], layer.in_features), generator=info.generator) for n, layer in layers.items()}
        try:
            Q = self._range(layers, omega, info.closure)
            for _ in range(self.niter):
                Z = self._left(layers, Q, info.closure)                 # Q^T G, (k x in)
                P = {n: torch.linalg.qr(z.T)[0] for n, z in Z.items()}  # (in x k)
                Q = self._range(layers, {n: p.T for n, p in P.items()}, info.closure)
            M = self._left(layers, Q, info.closure)                     # Q^T G
        except _NonFinite:
            log.warning("reinit 'fw': the knot batch's gradient is not finite, so link %d starts as 'lora' does",
                        info.link)
            return
        for name in layers:
            Ut, S, Vh = torch.linalg.svd(M[name].double(), full_matrices=False)
            r = ranks[name]
            self.subspaces[name] = ((Q[name].double() @ Ut[:, :r]).float(), Vh[:r].float())

    def _range(self, layers, rows: dict, closure) -> dict[str, torch.Tensor]:
        """``qr(G @ rows^T)`` per layer: one backward with ``A = rows``, ``B = 0``."""
        for name, layer in layers.items():
            layer.set_factors_(rows[name], torch.zeros(layer.out_features, rows[name].shape[0]))
        self._backward(layers, closure)
        grads = {n: _grad(layer.lora_B) / layer.scaling for n, layer in layers.items()}
        self._clear(layers)
        return {n: torch.linalg.qr(g)[0] for n, g in _finite(grads).items()}

    def _left(self, layers, Q: dict, closure) -> dict[str, torch.Tensor]:
        """``Q^T G`` per layer: one backward with ``B = Q``, ``A = 0``."""
        for name, layer in layers.items():
            layer.set_factors_(torch.zeros(Q[name].shape[1], layer.in_features), Q[name])
        self._backward(layers, closure)
        out = {n: _grad(layer.lora_A) / layer.scaling for n, layer in layers.items()}
        self._clear(layers)
        return _finite(out)

    @staticmethod
    def _backward(layers, closure) -> None:
        for layer in layers.values():
            layer.lora_A.grad = layer.lora_B.grad = None
        with torch.enable_grad():
            closure()

    @staticmethod
    def _clear(layers) -> None:
        for layer in layers.values():
            layer.lora_A.grad = layer.lora_B.grad = None

    # ------------------------------------------------------------------ the new link
    def reinit(self, layer, rank, info) -> None:
        found = self.subspaces.pop(info.name, None)
        if found is None:
            layer.set_factors_(_lora_a(rank, layer.in_features, info.generator), torch.zeros(layer.out_features, rank))
            return
        U, Vh = found
        A = Vh * _ROW_NORM
        if self.init == "A":
            layer.set_factors_(A, torch.zeros(layer.out_features, rank))
            return
        B = -U * self.scale
        dtype = layer.lora_A.dtype  # fold out exactly what the factors will hold
        A, B = A.to(dtype).float(), B.to(dtype).float()
        layer.set_factors_(torch.zeros_like(A), torch.zeros_like(B))
        layer.fold_(B, A, -layer.scaling)
        layer.set_factors_(A, B)

    def state_dict(self) -> dict:
        return {"warned": self._warned}

    def load_state_dict(self, state: dict) -> None:
        self._warned = bool(state.get("warned", False))
