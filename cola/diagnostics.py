"""What a knot did to the accumulated update, measured from the links' factors (no d x d matrix).

After m knots a layer's weight is ``W_0 + U_m`` with ``U_m = sum_j s_j B_j A_j``, the links folded
so far. The theory's mechanism is that later links add *new* directions, so that ``U_m`` reaches
beyond the rank of one link. Three numbers per layer show whether that happens:

* ``effective_rank``: the entropy effective rank (Roy & Vetterli) of ``U_m``;
* ``accumulated_norm``: ``||U_m||_F``;
* ``overlap``: how much of the newest link's net update ``D`` lies in the span of the previous
  links, ``||P_B D P_A||_F / ||D||_F`` with ``P_B`` the projector on the previous ``B``'s columns and
  ``P_A`` on the previous ``A``'s rows: 0 means entirely new directions, 1 means the new link only
  re-weights directions the chain already had (its cosine with the previous links' subspace).

A link's net update is what it added from its start to its knot: ``s B_m A_m`` for a link that
starts at ``B = 0``, and that minus what its re-init folded out of the weight at its start for
PiSSA-like re-inits (``fw`` with ``init="both"``), whose fold-out the layer records as an entry of
its own (``links`` is every folded entry, in order).

Everything is computed from thin QR factorisations of the stacked factors, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Link = tuple[torch.Tensor, torch.Tensor, float]   #: (B, A, scale) as the LoRA layer records it


@dataclass(frozen=True)
class UpdateStats:
    """The three knot diagnostics of one layer (``overlap`` is None for the first link)."""

    effective_rank: float
    accumulated_norm: float
    overlap: float | None


def _core(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A small matrix with the singular values of ``B @ A`` (``R_B R_A^T`` of the thin QRs)."""
    _, RB = torch.linalg.qr(B.double())
    _, RA = torch.linalg.qr(A.double().T)
    return RB @ RA.T


def effective_rank(B: torch.Tensor, A: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli) of ``B @ A`` from its factors, without forming it."""
    if B.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(_core(B, A))
    s = s[s > s.max() * 1e-12] if s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def stacked(links: list[Link]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat, A_cat)`` with ``B_cat @ A_cat = sum_j s_j B_j A_j`` (float64)."""
    B = torch.cat([b.double() * s for b, _, s in links], dim=1)
    A = torch.cat([a.double() for _, a, _ in links], dim=0)
    return B, A


def overlap(new: list[Link], previous: list[Link]) -> float | None:
    """``||P_B D P_A||_F / ||D||_F`` for the net update ``D`` of the entries ``new`` against the span of
    ``previous`` (None when there is nothing previous or ``D`` is zero)."""
    if not previous or not new:
        return None
    b, a = stacked(new)
    D_norm = float(torch.linalg.matrix_norm(_core(b, a)))
    if D_norm == 0.0:
        return None
    QB, _ = torch.linalg.qr(torch.cat([p[0].double() for p in previous], dim=1))
    QA, _ = torch.linalg.qr(torch.cat([p[1].double() for p in previous], dim=0).T)
    projected = (QB.T @ b) @ (a @ QA)     # (k x R) (R x k): Q_B^T D Q_A
    return min(1.0, float(torch.linalg.matrix_norm(projected)) / D_norm)


def update_stats(links: list[Link], newest_from: int | None = None) -> UpdateStats | None:
    """The diagnostics of a layer whose folded entries are ``links`` (None before the first knot); the
    newest link's net update is ``links[newest_from:]`` (default: the last entry)."""
    if not links:
        return None
    start = len(links) - 1 if newest_from is None else newest_from
    B, A = stacked(links)
    core = _core(B, A)
    return UpdateStats(effective_rank(B, A), float(torch.linalg.matrix_norm(core)),
                       overlap(links[start:], links[:start]))


def _mean(values) -> float | None:
    x = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(x) / len(x) if x else None


def knot_metrics(report) -> dict[str, float]:
    """A :class:`cola.KnotReport` summarised: the layers' mean and max of the folded update's norm,
    seconds, new rank and, where recorded, the gradient norm and the layer means of the diagnostics."""
    norms = list(report.norms.values())
    out = {"knot/link": report.link, "knot/norm_mean": _mean(norms),
           "knot/norm_max": max(norms) if norms else None, "knot/seconds": report.seconds,
           "knot/new_rank": report.new_rank, "knot/grad_norm": report.grad_norm}
    for name in ("effective_rank", "accumulated_norm", "overlap"):
        per_layer = getattr(report, name)
        out[f"knot/{name}_mean"] = _mean(per_layer.values()) if per_layer else None
    return {k: float(v) for k, v in out.items() if v is not None}
