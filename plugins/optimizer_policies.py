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
    """ReLoRA's partial reset: zero the ``fraction`` smallest-magnitude entries of every state tensor."""

    def __init__(self, config, fraction=0.99):
        self.fraction = check_fraction("fraction", fraction)

    @torch.no_grad()
    def apply(self, optimizer, params, info) -> None:
        for p in params:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.numel():
                    k = int(self.fraction * value.numel())
                    if k >= value.numel():
                        value.zero_()
                    elif k > 0:
                        threshold = value.abs().flatten().kthvalue(k).values
                        value.masked_fill_(value.abs() <= threshold, 0)


@cola.hookimpl
def cola_register_optimizer_policies(register):
    register("reset", Reset)
    register("keep", Keep)
    register("prune", Prune)
