"""A budgeted sweep's report: the learn / forget frontier each cell chose on (a table and a plot of every
tuning candidate's validation metric against its forgetting), whether each cell kept its budget on the report
seeds, and the forgetting on the other references (:mod:`cola.llm.sweep.tuning` makes the choices)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cola.io import markdown_table
from cola.llm.report_plots import save_figure
from cola.llm.tasks.tables import pm as _pm
from cola.llm.sweep.tuning import _fmt, _value_text


def budget_cell(row: dict[str, Any]) -> str:
    """Whether a cell kept the budget on its report seeds (it was chosen within it on the tuning seeds)."""
    tuning = row.get("tuning") or {}
    if tuning.get("over_budget"):
        least = tuning.get("least_forgetting") or {}
        return (f"no candidate within it on the tuning seeds (the least forgetting: "
                f"{_fmt(least.get('forgetting'), 2)} nats, KL {_fmt(least.get('reference_kl'), 2)})")
    check = row.get("budget_check")
    if not check:
        return "–"
    if check["kept"]:
        return "kept on every seed"
    return "broken on seeds " + "; ".join(f"{m}: {', '.join(map(str, seeds))}" for m, seeds in
                                          check["over_on_seeds"].items())


def more_lines(results: dict[str, Any]) -> list[str]:
    """The loss rise on the other references (``more_references``), per cell."""
    sources = sorted({src for row in results["cells"] for src in row.get("more_forgetting") or {}})
    if not sources:
        return []
    rows = [[row["label"], *[_pm((row.get("more_forgetting") or {}).get(src) or {}, 4) for src in sources]]
            for row in results["cells"] if row.get("more_forgetting")]
    return ["Forgetting on the other references (test loss rise over zero-shot, nats per token):", "",
            markdown_table(["cell", *sources], rows), ""]


def frontier_lines(results: dict[str, Any]) -> list[str]:
    """Per tuned cell, recall (the metric) against forgetting over its candidates (and the steps of their
    trajectories with ``tune_step``): the learn / forget frontier the budget cuts."""
    spec = results["spec"]
    metric = spec["metric"]
    rows, seen = [], set()
    for row in results["cells"]:
        tuning = row.get("tuning")
        if not tuning or not tuning.get("candidates") or row["key"] in seen:
            continue
        seen.add(row["key"])
        chosen = tuning.get("chosen") or {}
        for c in tuning["candidates"]:
            points = c.get("steps") or [{"step": None, **{k: c.get(k) for k in ("mean", "forgetting", "reference_kl",
                                                                               "admissible")}}]
            for p in points:
                picked = c["key"] == chosen.get("key") and (p["step"] == chosen.get("step") or (
                    chosen.get("step") is None and p is points[-1]))
                rows.append([row["label"], " ".join(f"{a}={_value_text(v)}" for a, v in c["values"].items()),
                             "end" if p["step"] is None else str(p["step"]), _fmt(p["mean"]), _fmt(p["forgetting"]),
                             _fmt(p["reference_kl"]), "yes" if p.get("admissible") else "no" if p.get("admissible")
                             is False else "–", "**picked**" if picked else ""])
    if not rows:
        return []
    return [f"Frontiers (every candidate's validation {metric} against its forgetting and KL to the start, mean over "
            "the tuning seeds; `within` the budget or not):", "",
            markdown_table(["cell", "candidate", "step", metric, "forgetting", "KL", "within", ""], rows), ""]


def tuning_frontier_plot(plt, view, out: Path) -> dict[str, Path]:
    """Per tuned cell, its candidates' validation metric against their forgetting (mean over the tuning seeds;
    with ``tune_step`` each candidate's trajectory as a line through its steps), the budget as a dashed line and
    the pick circled: the frontier each cell chose on."""
    rows, seen = [], set()
    for r in view.all_cells:
        tuning = r.get("tuning") or {}
        if tuning.get("candidates") and r["key"] not in seen and len(tuning["candidates"]) + bool(
                tuning.get("tune_step")) > 1:
            seen.add(r["key"])
            rows.append(r)
    if not rows or not any(c.get("forgetting") is not None for r in rows for c in r["tuning"]["candidates"]):
        return {}
    n = len(rows)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.6 * cols, 3.8 * ((n + cols - 1) // cols)),
                             squeeze=False)
    bound = view.spec.get("max_forgetting")
    for ax, r in zip(axes.flat, rows):
        tuning = r["tuning"]
        chosen = tuning.get("chosen") or {}
        for i, c in enumerate(tuning["candidates"]):
            points = [p for p in (c.get("steps") or [c]) if p.get("forgetting") is not None and p.get("mean") is not None]
            if not points:
                continue
            name = " ".join(f"{a}={v:g}" if isinstance(v, float) else f"{a}={v}" for a, v in c["values"].items())
            ax.plot([p["forgetting"] for p in points], [p["mean"] for p in points], marker="o", markersize=3,
                    color=f"C{i % 10}", label=name, linewidth=1)
            if c["key"] == chosen.get("key"):
                pick = next((p for p in points if p.get("step") == chosen.get("step")), points[-1])
                ax.plot([pick["forgetting"]], [pick["mean"]], marker="o", markersize=11, markerfacecolor="none",
                        color="black")
        if bound is not None:
            ax.axvline(bound, color="grey", linestyle="--", linewidth=1)
        ax.set_title(textwrap.fill(r["label"], 44), fontsize=8)
        ax.set_xlabel("validation forgetting (nats/token)", fontsize=8)
        ax.set_ylabel(f"validation {view.metric}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("tuning frontiers: each candidate (with --tune-step, along its trajectory); budget dashed, "
                 "pick circled", fontsize=9)
    return save_figure(plt, fig, out / "tuning_frontiers.png", "tuning_frontier_plot")
