"""The files of ``cola sweep``: ``results.json``, ``results.csv``, ``results.md`` and the plots.

* ``results.json``: the spec, every cell's summary (scores per seed, mean/std/n and interval,
  the paired comparison with the baseline, validation score after each link, mean loss curve,
  knots, ranks, trainable parameters and FLOPs per link, wall time), failures, versions.
* ``results.csv``: one row per cell (axis values as columns).
* ``results.md``: the table :func:`markdown` prints, with the statistics stated under it.
* ``accuracy_vs_links.png`` (when the grid varies ``links``), ``accuracy_vs_later_rank.png``
  (when the cells' later links differ in rank), ``loss_curves.png`` (mean training loss per
  cell, knots dashed), ``link_curves.png`` (validation score after each link), and for the corpus
  task ``learn_forget.png`` (each cell's perplexity against its forgetting, the learn/forget frontier)
  and ``knot_diagnostics.png`` (the chains' effective rank, norm and overlap per knot).
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from cola.io import atomic_write, markdown_table, write_json
from cola.llm import report, stats
from cola.llm.sweep import frontiers as sweep_frontiers, tuning as sweep_tuning
from cola.llm.report_plots import save_figure
from cola.llm.sweep.spec import label_of, short_name

log = logging.getLogger(__name__)


# ============================================================================ text

def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _score_text(score: dict[str, Any], digits: int = 3) -> str:
    if not score.get("n"):
        return "–"
    if score["std"] is None:
        return f"{score['mean']:.{digits}f}"
    return f"{score['mean']:.{digits}f} ± {score['std']:.{digits}f}"


def _params_text(per_link: list[int] | None) -> str:
    if not per_link:
        return "–"
    if len(set(per_link)) == 1:
        return f"{report.count_text(per_link[0])}" + (f" ×{len(per_link)}" if len(per_link) > 1 else "")
    return " / ".join(report.count_text(p) for p in per_link)


def markdown(results: dict[str, Any]) -> str:
    """The sweep's table, one row per cell, and what the statistics mean."""
    spec = results["spec"]
    metric = spec["metric"]
    conf = int(round(100 * spec["confidence"]))
    lines = [f"# cola sweep{': ' + spec['name'] if spec.get('name') else ''}", ""]
    if spec.get("description"):
        lines += [spec["description"].strip(), ""]
    lines += [f"Test {metric}, mean ± std over seeds; the difference with the baseline is paired by seed "
              f"(mean [{conf}% {spec['ci']} interval]). Baseline: {_baseline_text(spec['baseline'])}. "
              f"Status: {results['status']} ({results['runs_finished']}/{results['runs_expected']} runs).", "",
              sweep_tuning.statement(spec), ""]
    forgets = any("forgetting" in row for row in results["cells"])
    kls = any("reference_kl" in row for row in results["cells"])
    budgeted = any("budget_check" in row for row in results["cells"]) or bool(
        spec.get("max_forgetting") is not None or spec.get("max_kl") is not None)
    tuned = bool(spec.get("tune"))  # a "tuned" column only where the sweep tunes: the chosen values
    header = ["cell", "tuned", "n", f"test {metric}", "− baseline", "verdict", "validation after each link",
              "trainable / link", "train FLOPs", "× baseline", "s/run"]
    extra_header = (["forgetting", "− baseline (forgetting)"] if forgets else []) + (
        ["KL to the start", "− baseline (KL)"] if kls else []) + (["budget on the report seeds"] if budgeted else [])
    header[6:6] = extra_header
    table = []
    for row in results["cells"]:
        comp = row.get("comparison") or {}
        compute = row.get("compute") or {}
        diff, verdict, ratio = stats.interval_text(comp), comp.get("verdict"), _num(comp.get("flops_ratio"), 2)
        if comp.get("mean") is None:
            verdict = "(baseline)" if row.get("is_baseline_only") or row.get("baseline_key") == row["key"] else "–"
        curve = " → ".join(_num(p["mean"]) for p in row.get("validation_per_link") or []) or "–"
        wall = (compute.get("wall_seconds") or {}).get("mean")
        cells = [row["label"], sweep_tuning.chosen_text(row.get("tuning")), str(row["score"]["n"]),
                 _score_text(row["score"]), diff, verdict, curve, _params_text(compute.get("trainable_params_per_link")),
                 report.count_text(compute.get("train_flops")), ratio, _num(wall, 0)]
        extra = []
        for on, name in ((forgets, "forgetting"), (kls, "reference_kl")):
            if on:
                diff_of = comp.get(name) or {}
                extra += [_score_text(row.get(name) or {}, 4),
                          stats.interval_text(diff_of, 4) + (f" {diff_of['verdict']}" if diff_of.get("verdict") else "")]
        if budgeted:
            extra.append(sweep_frontiers.budget_cell(row))
        cells[6:6] = extra
        if row.get("comparison_note"):
            cells[5] = row["comparison_note"]
        table.append(cells if tuned else cells[:1] + cells[2:])
    if not tuned:
        header.remove("tuned")
    if not stats.higher_is_better(metric):
        lines += [f"Lower is better for {metric}" + (" and forgetting (the rise of the reference text's loss over "
                  "zero-shot, nats per token)" if forgets else "") + ": \"better\" means lower.", ""]
    lines += [markdown_table(header, table), ""] + sweep_frontiers.more_lines(results) + sweep_tuning.tuning_lines(results) \
        + sweep_frontiers.frontier_lines(results) + _retention_lines(results) \
        + _diagnostics_lines(results) + [
              "Validation after each link: zero-shot first, then after link 1, 2, ... (mean over seeds). "
              f"\"within noise\": the {conf}% interval of the mean paired difference covers 0; "
              "\"better\"/\"worse\": it does not. With 3 seeds a t interval is wide (t factor 4.30): "
              "that is the honest width, not a flaw."]
    if spec["ci"] == "bootstrap":
        lines.append("Bootstrap intervals over fewer than about 10 seeds have few distinct resamples and come "
                     "out too narrow; prefer --ci t for small n.")
    lines.append("FLOPs are estimates (forward + backward of the trained model, see cola train --dry-run); "
                 "× baseline = 1.00 means equal training compute.")
    if results.get("failures"):
        lines += ["", "Failed runs:"] + [f"- {f['label']} seed {f['seed']}: {f['error']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def _retention_lines(results: dict[str, Any]) -> list[str]:
    """The facts task: what each link after the first did to the facts recalled before it."""
    rows = [[r["label"], " → ".join(f"{p['kept']['mean']:.1f}/{p['lost']['mean']:.1f}/{p['new']['mean']:.1f}"
                                     if p["kept"]["n"] else "–" for p in r["retention"])]
            for r in results["cells"] if r.get("retention") and not r.get("is_baseline_only")]
    if not rows:
        return []
    return ["Facts kept / lost / new in each link after the first (validation facts, mean over seeds: kept = "
            "recalled before the link and after it, lost = before only, new = after only):", "",
            markdown_table(["cell", "links 2, 3, ...: kept/lost/new"], rows), ""]


def _diagnostics_lines(results: dict[str, Any]) -> list[str]:
    """What the knots added, per cell with knots: effective rank of the accumulated update and the
    overlap of each new link with the previous ones' span (means over layers and seeds)."""
    rows = [[r["label"], " → ".join(_num(p["effective_rank"], 1) for p in r["diagnostics"]),
             " → ".join(_num(p["overlap"], 3) for p in r["diagnostics"][1:]) or "–",
             " → ".join(_num(p["accumulated_norm"], 3) for p in r["diagnostics"])]
            for r in results["cells"] if r.get("diagnostics") and not r.get("is_baseline_only")]
    if not rows:
        return []
    return ["What each knot added (per knot, mean over layers and seeds; overlap 0: new directions, 1: inside the "
            "previous links' span):", "",
            markdown_table(["cell", "effective rank of the accumulated update", "overlap of the new link",
                            "‖accumulated update‖_F"], rows), ""]


def _baseline_text(baseline: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in baseline.items())


def format_plan(plan: dict[str, Any]) -> str:
    """The dry run's table: per cell its knots, ranks, trainable parameters and FLOPs."""
    header = ["cell", "run", "method", "steps", "knots", "ranks", "trainable / link", "train FLOPs", "× baseline"]
    rows = [[r["label"], r["key"], r["method"], str(r["steps"]), " ".join(map(str, r["knots"] or [])) or "–",
             " ".join(map(str, r["ranks"] or [])) or "–", _params_text(r["trainable_params_per_link"]),
             report.count_text(r["train_flops"]), _num(r["flops_ratio"], 2)] for r in plan["cells"]]
    tuned = ""
    if plan.get("tuning_runs") is not None and plan["spec"].get("tune"):
        header.append("tuning candidates")
        for row, r in zip(rows, plan["cells"]):
            row.append(str(r["tuning_candidates"]))
        tuned = (f", {plan['tuning_runs']} of them tuning runs on seeds "
                 f"{', '.join(map(str, plan['spec']['tune_seeds']))} (the plans below: at the settings' own values)")
    return (f"{len(plan['cells'])} rows, {plan['runs']} runs (shared runs counted once){tuned}; output "
            f"{plan['output_dir']}\n\n{markdown_table(header, rows)}\n")


def log_summary(results: dict[str, Any]) -> None:
    for row in results["cells"]:
        comp = row.get("comparison")
        if comp:
            log.info("%s vs %s: %s", row["label"], comp["baseline"], stats.format_difference(comp))


# ============================================================================ files

def write_all(results: dict[str, Any], out: str | Path, plots: bool = True) -> dict[str, str]:
    """Write the results files (and plots unless ``plots`` is false); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    written = {k: str(v) for k, v in files.items()}
    if plots:
        try:
            written.update({k: str(v) for k, v in write_plots(results, out).items()})
        except ImportError as exc:
            log.warning("plots not written: %s", exc)
    results["files"] = written
    atomic_write(files["markdown"], markdown(results))
    write_csv(results, files["csv"])
    write_json(files["json"], results)
    return written


def csv_rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of ``results.csv``: one row per cell."""
    axes = list(results["spec"]["grid"])
    extra_axes = [a for a in results["spec"]["baseline"] if a not in axes]
    columns = ["cell", *axes, *extra_axes, "tuned", "lr", "is_baseline", "baseline", "method", "links", "knots",
               "ranks", "steps",
               "n", "seeds", "mean", "std", "ci_low", "ci_high", "diff_mean", "diff_std", "diff_ci_low",
               "diff_ci_high", "verdict", "validation_per_link", "final_train_loss", "trainable_params_per_link",
               "train_flops_per_link", "train_flops", "flops_ratio", "train_seconds_mean", "wall_seconds_mean",
               "forgetting_mean", "reference_kl_mean", "tuned_step", "over_budget", "budget_kept"]
    rows = []
    for r in results["cells"]:
        comp = r.get("comparison") or {}
        compute = r.get("compute") or {}
        score = r["score"]
        tuned = (r.get("tuning") or {}).get("chosen")
        row = {"cell": r["label"], **{a: _csv_value(r["values"].get(a)) for a in [*axes, *extra_axes]},
               "tuned": _csv_value(tuned["values"]) if tuned and r["tuning"].get("tuned") else None, "lr": r.get("lr"),
               "is_baseline": bool(r.get("is_baseline_only") or r.get("baseline_key") == r["key"]),
               "baseline": r.get("baseline"), "method": r.get("method"), "links": r.get("links"),
               "knots": " ".join(map(str, r.get("knots") or [])), "ranks": " ".join(map(str, r.get("ranks") or [])),
               "steps": r.get("steps"), "n": score["n"], "seeds": " ".join(map(str, r["seeds"])),
               "mean": score["mean"], "std": score["std"], "ci_low": score["ci"][0], "ci_high": score["ci"][1],
               "diff_mean": comp.get("mean"), "diff_std": comp.get("std"), "diff_ci_low": comp.get("ci_low"),
               "diff_ci_high": comp.get("ci_high"), "verdict": comp.get("verdict"),
               "validation_per_link": " ".join(f"{p['mean']:.4f}" for p in r.get("validation_per_link") or []),
               "final_train_loss": (r.get("final_train_loss") or {}).get("mean"),
               "trainable_params_per_link": " ".join(map(str, compute.get("trainable_params_per_link") or [])),
               "train_flops_per_link": " ".join(f"{f:.4g}" for f in compute.get("train_flops_per_link") or []),
               "train_flops": compute.get("train_flops"), "flops_ratio": comp.get("flops_ratio"),
               "train_seconds_mean": (compute.get("train_seconds") or {}).get("mean"),
               "wall_seconds_mean": (compute.get("wall_seconds") or {}).get("mean"),
               "forgetting_mean": (r.get("forgetting") or {}).get("mean"),
               "reference_kl_mean": (r.get("reference_kl") or {}).get("mean"),
               "tuned_step": (tuned or {}).get("step") if tuned else None,
               "over_budget": bool((r.get("tuning") or {}).get("over_budget")),
               "budget_kept": (r.get("budget_check") or {}).get("kept")}
        rows.append(row)
    return columns, rows


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_csv(results: dict[str, Any], path: Path) -> None:
    report.write_rows(path, *csv_rows(results))


# ============================================================================ plots

def _others(row: dict[str, Any], exclude: set[str], axes: list[str]) -> str:
    return label_of({a: row["values"][a] for a in axes if a not in exclude and a in row["values"]})


def _legend(ax, fontsize: float) -> None:
    """The legend inside the axes for short labels; beside them, wrapped, when a cell's own values make
    long ones (they would cover the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if any(len(t) > 30 for t in labels):
        ax.legend(handles, [textwrap.fill(t, 34) for t in labels], fontsize=min(fontsize, 6.5),
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=fontsize)


def _errors(rows: list[dict[str, Any]]) -> np.ndarray:
    low = [r["score"]["mean"] - r["score"]["ci"][0] if r["score"]["ci"][0] is not None else 0.0 for r in rows]
    high = [r["score"]["ci"][1] - r["score"]["mean"] if r["score"]["ci"][1] is not None else 0.0 for r in rows]
    return np.array([low, high])


def write_plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """The sweep's plots (see the module docstring); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    view = _PlotView(results)
    paths: dict[str, Path] = {}
    for draw in (_links_plot, _rank_plot, _axis_plots, _curve_plots, _frontier_plot, sweep_frontiers.tuning_frontier_plot,
                 _diagnostics_plot):
        paths.update(draw(plt, view, out))
    return paths


class _PlotView:
    """What every plot reads from the results: the spec's axes, metric and confidence, and the cells."""

    def __init__(self, results: dict[str, Any]):
        self.spec = results["spec"]
        self.axes = list(self.spec["grid"])
        self.metric = self.spec["metric"]
        self.conf = int(round(100 * self.spec["confidence"]))
        self.cells = [r for r in results["cells"] if r["score"]["n"]]
        self.all_cells = list(results["cells"])   # with those that have no report run (over the budget)
        self.grid_cells = [r for r in self.cells if not r.get("is_baseline_only")
                           and all(a in r["values"] for a in self.axes)]  # not the extra cells
        self.by_key = {r["key"]: r for r in self.cells}


def _links_plot(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """Score vs chain length, and the paired difference with the baseline beside it."""
    spec, axes, metric, conf, grid_cells = view.spec, view.axes, view.metric, view.conf, view.grid_cells
    if not ("links" in axes and len({r["values"]["links"] for r in grid_cells}) > 1):
        return {}
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    groups: dict[str, list] = {}
    for r in grid_cells:
        groups.setdefault(_others(r, {"links"}, axes), []).append(r)
    for i, (name, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: r["values"]["links"])
        x = np.array([r["values"]["links"] for r in rows]) + 0.04 * (i - (len(groups) - 1) / 2)
        ax.errorbar(x, [r["score"]["mean"] for r in rows], yerr=_errors(rows), marker="o", capsize=3, label=name,
                    color=f"C{i}")
        comps = [(xi, r["comparison"]) for xi, r in zip(x, rows) if r.get("comparison")
                 and r["comparison"].get("ci_low") is not None]
        if comps:
            dax.errorbar([c[0] for c in comps], [c[1]["mean"] for c in comps],
                         yerr=[[c[1]["mean"] - c[1]["ci_low"] for c in comps],
                               [c[1]["ci_high"] - c[1]["mean"] for c in comps]],
                         marker="o", capsize=3, linestyle="none", color=f"C{i}", label=name)
    ticks = sorted({r["values"]["links"] for r in grid_cells})
    ax.set_xticks(ticks)
    ax.set_xlabel("chain length (links; same total steps)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{metric} vs chain length (mean, {conf}% t interval)", fontsize=10)
    dax.axhline(0.0, color="black", linewidth=0.8)
    dax.set_xticks(ticks)
    dax.set_xlabel("chain length (links)")
    dax.set_ylabel("paired difference with the baseline")
    dax.set_title(f"minus baseline, paired by seed ({conf}% {spec['ci']} interval)", fontsize=10)
    for a in (ax, dax):
        a.grid(alpha=0.3)
        if len(groups) > 1 or next(iter(groups)) != "(base settings)":
            _legend(a, 8)
    return save_figure(plt, fig, out / "accuracy_vs_links.png", "links_plot")


#: numeric axes with plots of their own (links, later_rank) or that are no "amount" to plot against
_NOT_PLOTTED = ("links", "chain.rank_schedule_options.later_rank", "seeds")


def _axis_plots(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """Score vs every numeric axis with three or more values (e.g. ``n_train``: a capacity map), one line
    per value of the other axes, the extra cells that share the axis included; log scale for a geometric
    axis."""
    paths: dict[str, Path] = {}
    for axis in view.axes:
        rows = [r for r in view.cells if isinstance(r["values"].get(axis), (int, float))
                and not isinstance(r["values"].get(axis), bool)]
        values = sorted({r["values"][axis] for r in rows})
        if axis in _NOT_PLOTTED or len(values) < 3:
            continue
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(label_of({k: v for k, v in r["values"].items() if k != axis}), []).append(r)
        for i, (name, group) in enumerate(groups.items()):
            group = sorted(group, key=lambda r: r["values"][axis])
            ax.errorbar([r["values"][axis] for r in group], [r["score"]["mean"] for r in group],
                        yerr=_errors(group), marker="o", capsize=3, color=f"C{i % 10}", label=name)
        if values[0] > 0 and values[-1] / values[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(values)
            ax.set_xticklabels([f"{v:g}" for v in values])
        ax.set_xlabel(short_name(axis))
        ax.set_ylabel(f"test {view.metric}")
        ax.set_title(f"{view.metric} vs {short_name(axis)} (mean, {view.conf}% t interval)", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, 7)
        paths.update(save_figure(plt, fig, out / f"{view.metric}_vs_{short_name(axis)}.png", f"{axis}_plot"))
    return paths


def _rank_plot(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """Score vs the rank of the later links (rank step-down), with the baseline dashed."""
    axes, metric, conf, by_key = view.axes, view.metric, view.conf, view.by_key
    chained = [r for r in view.grid_cells if (r.get("links") or 1) > 1 and r.get("ranks")]
    if len({r["ranks"][-1] for r in chained}) <= 1:
        return {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rank_axes = {a for a in axes if "rank" in a}
    groups = {}
    for r in chained:
        groups.setdefault(_others(r, rank_axes, axes), []).append(r)
    for i, (name, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: r["ranks"][-1])
        ax.errorbar([r["ranks"][-1] for r in rows], [r["score"]["mean"] for r in rows], yerr=_errors(rows),
                    marker="o", capsize=3, color=f"C{i}", label=f"chain {name}".strip())
        base = by_key.get(rows[0].get("baseline_key"))
        if base is not None:
            ax.axhline(base["score"]["mean"], color=f"C{i}", linestyle="--", alpha=0.8,
                       label=f"{rows[0]['baseline']}")
            if base["score"]["ci"][0] is not None:
                ax.axhspan(base["score"]["ci"][0], base["score"]["ci"][1], color=f"C{i}", alpha=0.08)
    ax.set_xlabel("rank of the later links")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{metric} vs later-link rank (baseline dashed; {conf}% t intervals)")
    ax.grid(alpha=0.3)
    _legend(ax, 8)
    return save_figure(plt, fig, out / "accuracy_vs_later_rank.png", "rank_plot")


def _curve_plots(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """Loss curves and per-link validation curves, one panel per value of the axes but the first."""
    axes, metric = view.axes, view.metric
    runs = list({r["key"]: r for r in view.cells}.values())
    if not runs:
        return {}
    paths: dict[str, Path] = {}
    first = axes[0] if axes else None
    panels: dict[str, list] = {}
    for r in runs:
        panels.setdefault(_others(r, {first} if first else set(), axes), []).append(r)
    names = list(panels)[:12]
    if len(panels) > 12:
        log.warning("loss and link plots: %d panels, only the first 12 drawn", len(panels))
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    for kind in ("loss", "link"):
        fig, grid = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
        for p, name in enumerate(names):
            ax = grid[p // cols][p % cols]
            for i, r in enumerate(panels[name]):
                color = f"C{i}"
                # the panel names the other axes; the label the first axis and a cell's own values
                label = r["label"] if not first or r.get("is_baseline_only") else label_of(
                    {k: v for k, v in r["values"].items() if k == first or k not in axes})
                if kind == "loss" and r.get("train_loss_mean"):
                    y = np.array(r["train_loss_mean"])
                    window = max(1, len(y) // 20)
                    smooth = np.convolve(y, np.ones(window) / window, mode="valid")
                    ax.plot(np.arange(window, len(y) + 1), smooth, color=color, label=label)
                    for knot in r.get("knots") or []:
                        ax.axvline(knot, color=color, linestyle="--", alpha=0.5)
                elif kind == "link" and r.get("validation_per_link"):
                    curve = r["validation_per_link"]
                    ax.errorbar([c["after_link"] for c in curve], [c["mean"] for c in curve],
                                yerr=[c["std"] or 0.0 for c in curve], marker="o", capsize=2, color=color,
                                label=label)
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_xlabel("optimizer step (knots dashed)" if kind == "loss" else "after link (0: zero-shot)")
            ax.set_ylabel("training loss (mean over seeds)" if kind == "loss" else f"validation {metric}")
            _legend(ax, 7)
        for p in range(len(names), rows_n * cols):
            grid[p // cols][p % cols].axis("off")
        paths.update(save_figure(plt, fig, out / ("loss_curves.png" if kind == "loss" else "link_curves.png"),
                                 "loss_plot" if kind == "loss" else "link_plot", dpi=110))
    return paths


def _frontier_plot(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """The learn / forget frontier (corpus sweeps): every cell's metric against its forgetting, with
    the seeds' t intervals as error bars."""
    rows = [r for r in view.cells if r.get("forgetting", {}).get("n")]
    if not rows:
        return {}
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for i, r in enumerate(rows):
        f = r["forgetting"]
        low, high = (stats.mean_interval(f["values"], view.spec["confidence"], "t") if f["n"] > 1 else (None, None))
        xerr = [[f["mean"] - low], [high - f["mean"]]] if low is not None else None
        ax.errorbar([f["mean"]], [r["score"]["mean"]], xerr=xerr, yerr=_errors([r]), marker="o", capsize=3,
                    color=f"C{i % 10}", label=r["label"], linestyle="none")
    ax.set_xlabel("forgetting: rise of the reference text's loss over zero-shot (nats/token)")
    ax.set_ylabel(f"test {view.metric}")
    corner = "upper-left" if stats.higher_is_better(view.metric) else "lower-left"
    ax.set_title(f"learn / forget: each cell's mean ({view.conf}% t intervals); {corner} is better", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    return save_figure(plt, fig, out / "learn_forget.png", "frontier_plot")


def _diagnostics_plot(plt, view: _PlotView, out: Path) -> dict[str, Path]:
    """Per cell with knots: effective rank of the accumulated update and overlap of each new link."""
    rows = [r for r in view.grid_cells if r.get("diagnostics")]
    if not rows:
        return {}
    fig, (rax, oax) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for i, r in enumerate(rows):
        d = r["diagnostics"]
        rax.plot([p["knot"] for p in d], [p["effective_rank"] for p in d], marker="o", color=f"C{i % 10}",
                 label=r["label"])
        later = [p for p in d if p["overlap"] is not None]
        oax.plot([p["knot"] for p in later], [p["overlap"] for p in later], marker="o", color=f"C{i % 10}",
                 label=r["label"])
    rax.set_title("effective rank of the accumulated update", fontsize=10)
    oax.set_title("overlap of the new link with the previous links' span", fontsize=10)
    for ax in (rax, oax):
        ax.set_xlabel("knot (links folded so far)")
        ax.grid(alpha=0.3)
        _legend(ax, 7)
    return save_figure(plt, fig, out / "knot_diagnostics.png", "diagnostics_plot")
