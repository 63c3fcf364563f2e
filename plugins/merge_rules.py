"""Merge rules: which low-rank update a knot folds into the weights."""

from __future__ import annotations

import torch

import cola
from cola import ConfigError

from ._options import fraction, positive_int


class Add:
    """Fold the whole link: ``W += scaling * B @ A`` (the paper)."""

    def __init__(self, config):
        pass

    def factors(self, layer):
        return layer.lora_B.detach(), layer.lora_A.detach(), layer.scaling


class SVDTruncate:
    """Fold only the top singular part of the link: a fixed ``rank`` k, or the smallest k whose
    singular values hold ``energy`` of the squared Frobenius norm. The rest is dropped, so this
    rule changes the function at a knot by design."""

    def __init__(self, config, rank=None, energy=None):
        if rank is not None and energy is not None:
            raise ConfigError("merge rule 'svd-truncate' takes rank or energy, not both")
        self.k = None if rank is None else positive_int("rank", rank)
        self.energy = fraction("energy", 0.99 if energy is None else energy, low_open=True)

    def factors(self, layer):
        B, A = layer.lora_B.detach().float(), layer.lora_A.detach().float()
        QB, RB = torch.linalg.qr(B)
        QA, RA = torch.linalg.qr(A.T)
        U, S, Vh = torch.linalg.svd(RB @ RA.T)
        if self.k is not None:
            k = min(self.k, S.numel())
        else:
            cum = torch.cumsum(S ** 2, 0)
            total = float(cum[-1]) if S.numel() else 0.0
            k = int((cum < self.energy * total).sum()) + 1 if total > 0 else 1
        return (QB @ U[:, :k]) * S[:k], Vh[:k] @ QA.T, layer.scaling


@cola.hookimpl
def cola_register_merge_rules(register):
    register("add", Add)
    register("svd-truncate", SVDTruncate)
