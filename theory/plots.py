"""PNG figures of the checks' curves (matplotlib, no pyplot state: safe in any process)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_rate", "plot_practical", "plot_rac", "write_plots"]

_TINY = 1e-16  # floor for log axes (exact zeros happen when a run reaches f*)


def _figure(ncols: int = 1, width: float = 6.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _positive(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return np.where(np.isfinite(y), np.maximum(y, _TINY), np.nan)


def plot_rate(rate: dict[str, Any], path: Path) -> Path:
    """Log-log mean Frank-Wolfe gap against T, with Theorem 4.1's bound and the fitted slope."""
    fig, axes = _figure(len(rate))
    for ax, (key, c) in zip(axes, rate.items()):
        T = np.asarray(c["T"], dtype=np.float64)
        ax.loglog(T, c["mean_gap"], "o-", label="observed (1/T) sum g_t")
        ax.loglog(T, c["bound"], "k--", label="bound 2 sqrt(M beta) D / sqrt(T)")
        tail = T >= c["fit_from"]
        fit = np.exp(np.polyfit(np.log(T[tail]), np.log(np.asarray(c["mean_gap"])[tail]), 1))
        ax.loglog(T[tail], fit[1] * T[tail] ** c["slope"], ":", color="C3",
                  label=f"fit T >= {c['fit_from']}: slope {c['slope']:.3f}")
        ax.set_title(f"idealised COLA (Frank-Wolfe): {c['label']}", fontsize=9)
        ax.set_xlabel("T (links)")
        ax.set_ylabel("mean FW gap")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_practical(curves: dict[str, Any], floor: float, path: Path) -> Path:
    """f - f* against step for LoRA, COLA with 2/3/5 links and the full update."""
    fig, (ax,) = _figure(1, 7.0)
    for label, y in curves.items():
        ax.semilogy(_positive(y), label=label, lw=1.4, ls="--" if label == "full update" else "-")
    ax.axhline(max(floor, _TINY), color="k", ls=":", lw=1, label="rank-r floor (best rank-r W)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("f(W) - f*")
    ax.set_title("least squares, target rank > link rank (Adam)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_rac(counterexample: dict[str, Any], floor: float, rac_pl: dict[str, Any], path: Path) -> Path:
    """Left: the toy quadratic at step 1/L; right: RAC-LoRA's mean gap against its PL bound."""
    fig, (left, right) = _figure(2)
    top = 1e3 * max(float(np.asarray(y)[0]) for y in counterexample.values())
    for i, (label, y) in enumerate(counterexample.items()):
        y = _positive(y)
        blown = ~(y < top)
        if blown.any():  # diverged: draw up to the frame and mark where it left
            stop = int(np.argmax(blown))
            label = f"{label} (diverges, step {stop})"
            left.semilogy(np.arange(stop), y[:stop], color=f"C{i}", ls="--" if i % 2 else "-", label=label)
            left.plot([stop], [top], "x", color=f"C{i}", ms=8, clip_on=False)
        else:
            left.semilogy(y, color=f"C{i}", label=label)
    left.set_ylim(top=top)
    left.axhline(max(floor, _TINY), color="k", ls=":", lw=1, label="rank-r floor")
    left.set_title("Hessian diag(10, 1, ..., 1), step 1/L (cola.Chain)", fontsize=9)
    left.set_xlabel("step")
    left.set_ylabel("f(W) - f*")
    left.legend(fontsize=8)
    for i, (key, c) in enumerate(rac_pl.items()):
        gap = np.asarray(c["gap"], dtype=np.float64)
        right.semilogy(_positive(gap / gap[0]), color=f"C{i}", label=f"{key}: E f - f* (normalised)")
        right.semilogy(_positive(np.asarray(c["bound_curve"]) / gap[0]), color=f"C{i}", ls="--", lw=1)
    right.set_title("RAC-LoRA under PL: observed (solid) vs bound (dashed)", fontsize=9)
    right.set_xlabel("step (= link)")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def write_plots(curves: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every figure whose curves the checks produced; returns the files written."""
    out_dir = Path(out_dir)
    written = []
    if "fw_rate" in curves:
        written.append(plot_rate(curves["fw_rate"], out_dir / "gap_vs_T.png"))
    if "practical" in curves:
        written.append(plot_practical(curves["practical"], curves["practical_floor"], out_dir / "loss_vs_step.png"))
    if "counterexample" in curves and "rac_pl" in curves:
        written.append(plot_rac(curves["counterexample"], curves["counterexample_floor"], curves["rac_pl"],
                                out_dir / "rac.png"))
    return written
