"""The plots of a ``cola train`` run (PNG, matplotlib's Agg backend).

* ``accuracy_per_link.png`` / ``perplexity_per_link.png``: the validation score zero-shot and after
  every link (the COLA curve), mean and std over seeds;
* ``training_loss.png``: the loss per step, knots dashed;
* ``knot_diagnostics.png`` (runs with knots): per knot, over the layers, the effective rank and the
  norm of the accumulated update and the overlap of the newest link with the previous ones
  (:mod:`cola.diagnostics`): do later links add new directions?
* ``learn_forget.png`` (the corpus task): domain perplexity against forgetting, one point per run
  and per method's mean: the learn / forget frontier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cola.io import atomic_writer
from cola.llm.records import losses, primary_metric
from cola.llm.tasks.tables import complete_runs


def write_plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Every plot that applies to ``results``; ``{key: path}``. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    for draw in (_curve_plot, _loss_plot, _diagnostics_plot, _frontier_plot):
        paths.update(draw(plt, results, out))
    return paths


def _colors(results: dict[str, Any]) -> dict[str, str]:
    return {m: f"C{i}" for i, m in enumerate(results["plan"]["methods"])}


def save_figure(plt, fig, path: Path, key: str, dpi: int = 120) -> dict[str, Path]:
    """Lay out, write (atomically, as every result file) and close ``fig``; ``{key: path}`` for the
    results' file list."""
    fig.tight_layout()
    try:
        atomic_writer(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return {key: path}


def _curve_plot(plt, results: dict[str, Any], out: Path) -> dict[str, Path]:
    metric = primary_metric(results["settings"])
    colors = _colors(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for method in results["plan"]["methods"]:
        entry = results.get("summary", {}).get(method)
        if not entry or not entry["validation_curve"]:
            continue
        curve = entry["validation_curve"]
        ax.errorbar([c["step"] for c in curve], [c["mean"] for c in curve], yerr=[c["std"] or 0.0 for c in curve],
                    marker="o", capsize=3, color=colors[method],
                    label=f"{method} ({len(curve) - 1} link{'s' if len(curve) > 2 else ''})")
        for c in curve[1:]:
            ax.annotate(f"{c['after_link']}", (c["step"], c["mean"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8, color=colors[method])
        drawn = True
    if not drawn:
        plt.close(fig)
        return {}
    what = {"perplexity": "perplexity (held-out blocks)", "recall": "recall (exact match, facts taught)"}.get(
        metric, f"accuracy (rule {results['settings']['eval_rule']})")
    ax.set_xlabel("optimizer step (points: zero-shot, then after each link)")
    ax.set_ylabel(f"validation {what}")
    ax.set_title(f"{results['plan']['task']}: {metric} after each link (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    if metric == "accuracy":
        return save_figure(plt, fig, out / "accuracy_per_link.png", "accuracy_plot")
    return save_figure(plt, fig, out / f"{metric}_per_link.png", f"{metric}_plot")


def _loss_plot(plt, results: dict[str, Any], out: Path) -> dict[str, Path]:
    colors = _colors(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn, knots_marked = False, set()
    for method in results["plan"]["methods"]:
        runs = complete_runs(results, method)
        curves = [losses(r["train_loss"]) for r in runs if r["train_loss"]]
        if not curves:
            continue
        n = min(len(x) for x in curves)
        mean = np.nanmean([x[:n] for x in curves], axis=0)  # a step skipped on every seed stays a gap
        window = max(1, n // 25)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid") if window > 1 else mean
        steps = np.arange(1, n + 1)[window - 1:] if window > 1 else np.arange(1, n + 1)
        ax.plot(np.arange(1, n + 1), mean, color=colors[method], alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color=colors[method], label=f"{method}")
        for knot in runs[0].get("knots") or []:
            ax.axvline(knot, color=colors[method], linestyle="--", alpha=0.6,
                       label=f"{method} knots" if method not in knots_marked else None)
            knots_marked.add(method)
        drawn = True
    if not drawn:
        plt.close(fig)
        return {}
    objective = {"corpus": "LM loss", "facts": "answer tokens' NLL"}.get(results["settings"].get("task"),
                                                                        results["settings"]["loss"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({objective})")
    ax.set_title("training loss (mean over seeds; knots dashed)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(plt, fig, out / "training_loss.png", "loss_plot")


DIAGNOSTICS = (("effective_rank", "effective rank of the accumulated update"),
               ("accumulated_norm", "‖accumulated update‖_F"),
               ("overlap", "overlap of the new link with the previous ones"))


def knot_means(report: dict[str, Any], key: str) -> float | None:
    """The mean over layers of one diagnostic of a knot report (None when not recorded)."""
    values = [v for v in (report.get(key) or {}).values() if v is not None]
    return float(np.mean(values)) if values else None


def _diagnostics_plot(plt, results: dict[str, Any], out: Path) -> dict[str, Path]:
    colors = _colors(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    drawn = False
    for method in results["plan"]["methods"]:
        runs = [r for r in complete_runs(results, method) if r.get("knot_reports")]
        for ax, (key, label) in zip(axes, DIAGNOSTICS):
            per_run = [[knot_means(k, key) for k in r["knot_reports"]] for r in runs]
            per_run = [[v for v in p if v is not None] for p in per_run]
            if not per_run or not per_run[0]:
                continue
            n = min(len(p) for p in per_run)
            mean = np.mean([p[:n] for p in per_run], axis=0)
            ax.plot(np.arange(1, n + 1) + (key == "overlap"), mean, marker="o", color=colors[method], label=method)
            ax.set_title(label, fontsize=9)
            drawn = True
    if not drawn:
        plt.close(fig)
        return {}
    for ax in axes:
        ax.set_xlabel("knot (links folded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("what each knot added (mean over layers and seeds)", fontsize=10)
    return save_figure(plt, fig, out / "knot_diagnostics.png", "diagnostics_plot")


def _frontier_plot(plt, results: dict[str, Any], out: Path) -> dict[str, Path]:
    task = results["settings"].get("task")
    if task not in ("corpus", "facts"):
        return {}
    metric = primary_metric(results["settings"])
    colors = _colors(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    zero = results["zero_shot"]["test"]
    ax.scatter([0.0], [zero[metric]], marker="*", s=120, color="black", label="zero-shot")
    for method in results["plan"]["methods"]:
        runs = complete_runs(results, method)
        points = [(r["test"]["forgetting"], r["test"][metric]) for r in runs if "forgetting" in r["test"]]
        if not points:
            continue
        x, y = zip(*points)
        ax.scatter(x, y, color=colors[method], alpha=0.45, s=18)
        ax.scatter([np.mean(x)], [np.mean(y)], color=colors[method], s=70, edgecolor="black", label=method)
    ax.set_xlabel("forgetting: rise of the reference loss over zero-shot (nats/token)")
    corner = "lower-left" if metric == "perplexity" else "upper-left"
    ax.set_ylabel("held-out domain perplexity (test)" if metric == "perplexity" else "recall of the facts taught")
    ax.set_title(f"learn / forget: {corner} is better (small: each seed; large: mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, out / "learn_forget.png", "frontier_plot")
