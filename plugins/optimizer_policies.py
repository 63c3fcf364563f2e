"""Optimizer-state policies: what a knot does to the optimizer's state of the LoRA parameters."""

from __future__ import annotations

import torch

import cola

from ._options import fraction as check_fraction


class Reset:
    """Drop all state (moments, step counts) of the LoRA parameters: the paper's reset."""

    def __init__(self, config):
        pass

    def apply(self, optimizer, params, info) -> None:
        for p in params:
            optimizer.state.pop(p, None)


class Keep:
    """Keep the state (state of a parameter whose shape changed is dropped by the chain)."""

    def __init__(self, config):
        pass

    def apply(self, optimizer, params, info) -> None:
        pass


class Prune:
    """ReLoRA's partial reset: zero the ``fraction`` smallest-magnitude entries of every state tensor.

    ``joint=False`` (ReLoRA's own) prunes each state tensor by its own magnitudes, so an entry can keep
    its first moment and lose its second. Adam then divides the kept momentum by ``sqrt(0) + eps``: right
    after a ``lora`` re-init the new A's gradient is exactly zero (B = 0), and such an entry moves by
    ``lr * m / eps``, which blew up every pruned chain of the facts comparison (docs/sweeps.md).
    ``joint=True`` keeps an entry of every state tensor only where the second moment (``exp_avg_sq``,
    ``max_exp_avg_sq``) keeps it: no entry keeps momentum without its scale, so every first step is bounded
    as in a fresh Adam. Optimizers without a second moment are pruned tensor by tensor either way.
    """

    SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, config, fraction=0.99, joint=False):
        self.fraction = check_fraction("fraction", fraction)
        if not isinstance(joint, bool):
            raise cola.ConfigError(f"joint={joint!r}: must be true or false")
        self.joint = joint

    def _keep(self, value: torch.Tensor) -> torch.Tensor:
        """The mask of the entries of ``value`` that survive pruning by magnitude."""
        k = int(self.fraction * value.numel())
        if k >= value.numel():
            return torch.zeros_like(value, dtype=torch.bool)
        if k == 0:
            return torch.ones_like(value, dtype=torch.bool)
        magnitude = value.abs()
        return magnitude > magnitude.flatten().kthvalue(k).values

    @torch.no_grad()
    def apply(self, optimizer, params, info) -> None:
        for p in params:
            state = optimizer.state.get(p, {})
            tensors = {name: value for name, value in state.items()
                       if isinstance(value, torch.Tensor) and value.shape == p.shape and value.numel()}
            shared = None
            if self.joint:
                for name in self.SECOND_MOMENTS:
                    if name in tensors:
                        keep = self._keep(tensors[name])
                        shared = keep if shared is None else shared & keep
            for value in tensors.values():
                value.masked_fill_(~(shared if shared is not None else self._keep(value)), 0)


@cola.hookimpl
def cola_register_optimizer_policies(register):
    register("reset", Reset)
    register("keep", Keep)
    register("prune", Prune)
