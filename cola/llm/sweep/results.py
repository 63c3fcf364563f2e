"""The results of a sweep: each cell's scores over seeds, its curves and compute, and the paired
comparison with its baseline (:mod:`cola.llm.stats`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cola.llm import stats
from cola.llm.records import losses, mean_loss
from cola.llm.sweep.cells import Cell
from cola.llm.sweep.spec import SweepSpec


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_status(run_dir: Path) -> str:
    """``complete``, ``partial`` (started: resumable) or ``new``."""
    results = read_json(run_dir / "results.json")
    if results and results.get("status") == "complete" and results.get("runs"):
        return "complete"
    return "partial" if (run_dir / "settings.json").is_file() else "new"


def _seed_records(out: Path, key: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """``{seed: (record, plan, settings)}`` of the complete runs of ``key``."""
    found = {}
    for seed in seeds:
        results = read_json(out / "runs" / key / f"seed{seed}" / "results.json")
        if not results or results.get("status") != "complete" or not results.get("runs"):
            continue
        record = results["runs"][0]
        found[seed] = {"record": record, "plan": results["plan"]["methods"][record["method"]],
                       "total_steps": results["plan"]["total_steps"], "settings": results["settings"]}
    return found


def summarize_cell(cell: Cell, found: dict[int, dict[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """Mean/std/n of the score, the per-link validation curve, the loss curve, and compute."""
    metric = spec.metric
    seeds = sorted(found)
    scores = {s: float(found[s]["record"]["test"][metric]) for s in seeds}
    entry: dict[str, Any] = {
        "label": cell.label, "values": cell.values, "key": cell.key, "is_baseline_only": cell.is_baseline_only,
        "baseline": cell.baseline_label, "baseline_key": cell.baseline_key, "seeds": seeds, "scores": scores,
        "score": stats.describe(list(scores.values())), "tuning": cell.tuning,
    }
    low, high = stats.mean_interval(list(scores.values()), spec.confidence, "t") if len(scores) > 1 else (None, None)
    entry["score"]["ci"] = [low, high]
    if not seeds:
        return entry
    first = found[seeds[0]]
    record, plan = first["record"], first["plan"]
    entry.update(method=record["method"], links=len(record.get("knots") or []) + 1, knots=record.get("knots") or [],
                 ranks=record.get("ranks") or [], steps=first["total_steps"], lr=record.get("lr"))
    curves = [found[s]["record"].get("curve") or [] for s in seeds]
    n_points = min(len(c) for c in curves)
    entry["validation_per_link"] = [
        {"after_link": curves[0][i]["after_link"], "step": curves[0][i]["step"],
         **stats.describe([c[i]["validation"][metric] for c in curves])} for i in range(n_points)
        if all(metric in c[i]["validation"] for c in curves)]
    tests = [found[s]["record"]["test"] for s in seeds]
    if all("forgetting" in t for t in tests):  # the corpus and facts tasks: learn and forget
        entry["forgetting_scores"] = {s: float(found[s]["record"]["test"]["forgetting"]) for s in seeds}
        entry["forgetting"] = stats.describe(list(entry["forgetting_scores"].values()))
    if all(t.get("reference_kl") is not None for t in tests):   # the KL to the start on the reference
        entry["kl_scores"] = {s: float(found[s]["record"]["test"]["reference_kl"]) for s in seeds}
        entry["reference_kl"] = stats.describe(list(entry["kl_scores"].values()))
    more = [t.get("more_references") or {} for t in tests]
    if more and all(more):
        entry["more_forgetting"] = {src: stats.describe([m[src].get("forgetting") for m in more])
                                    for src in more[0] if all(m.get(src, {}).get("forgetting") is not None
                                                              for m in more)}
    budget = spec.budget
    if budget and seeds:   # the budget was set on the tuning seeds: is it kept on the report seeds?
        over = {measure: [s for s in seeds if not sweep_budget_ok(found[s]["record"]["test"], measure, bound)]
                for measure, bound in budget.items()}
        entry["budget_check"] = {"budget": budget, "over_on_seeds": {m: v for m, v in over.items() if v},
                                 "kept": not any(over.values())}
    entry["retention"] = retention_per_link(curves)
    entry["diagnostics"] = knot_diagnostics([found[s]["record"] for s in seeds])
    curves = [losses(found[s]["record"]["train_loss"]) for s in seeds if found[s]["record"].get("train_loss")]
    if curves:
        n = min(len(x) for x in curves)
        mean = np.nanmean([x[:n] for x in curves], axis=0) if all(np.isfinite(x[:n]).any() for x in curves) else []
        entry["train_loss_mean"] = [float(v) if np.isfinite(v) else None for v in mean]
        finals = [mean_loss(list(x[-10:])) for x in curves]
        entry["final_train_loss"] = stats.describe([v for v in finals if v is not None])
    per_link = plan.get("train_flops")
    entry["compute"] = {
        "trainable_params_per_link": plan.get("trainable_params"),
        "trainable_params_max": max(plan["trainable_params"]) if plan.get("trainable_params") else None,
        "train_flops_per_link": per_link, "train_flops": sum(per_link) if per_link else None,
        "eval_flops": plan.get("eval_flops"),
        "train_seconds": stats.describe([found[s]["record"]["seconds"]["train"] for s in seeds]),
        "wall_seconds": stats.describe([found[s]["record"]["seconds"].get("total", 0.0) for s in seeds]),
    }
    return entry


def sweep_budget_ok(test: dict[str, Any], measure: str, bound: float) -> bool:
    """Whether a run's test ``measure`` (``forgetting`` or ``reference_kl``) is within ``bound``."""
    value = test.get(measure)
    return value is not None and np.isfinite(value) and value <= bound


def retention_per_link(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The facts task, per link after the first: facts kept from the link before, lost and new (mean and
    std over seeds; :func:`cola.llm.tasks.facts_scoring.retention`); empty for the other tasks."""
    n = min((len(c) for c in curves), default=0)
    out = []
    for i in range(2, n):
        if not all("kept" in c[i]["validation"] for c in curves):
            continue
        point = {"after_link": curves[0][i]["after_link"]}
        for key in ("kept", "lost", "new", "kept_fraction"):
            values = [c[i]["validation"][key] for c in curves if c[i]["validation"][key] is not None]
            point[key] = stats.describe(values)
        out.append(point)
    return out


def knot_diagnostics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per knot, over the layers and then the seeds: the mean effective rank and norm of the accumulated
    update and the overlap of the newest link with the previous ones (:mod:`cola.diagnostics`)."""
    reports = [r.get("knot_reports") or [] for r in records]
    n = min((len(x) for x in reports), default=0)
    out = []
    for k in range(n):
        point: dict[str, Any] = {"knot": k + 1, "step": reports[0][k]["step"]}
        for key in ("effective_rank", "accumulated_norm", "overlap"):
            per_seed = [np.mean([v for v in (x[k].get(key) or {}).values() if v is not None] or [np.nan])
                        for x in reports]
            finite = [float(v) for v in per_seed if np.isfinite(v)]
            point[key] = float(np.mean(finite)) if finite else None
        out.append(point)
    return out


def aggregate(spec: SweepSpec, out: Path, cells: list[Cell], extra: list[Cell]) -> list[dict[str, Any]]:
    """One summary per cell and baseline run, each cell with its paired comparison."""
    entries = {}
    for cell in [*extra, *cells]:
        entries.setdefault(id(cell), summarize_cell(cell, _seed_records(out, cell.key, spec.seeds), spec))
    by_key = {}
    for cell in [*extra, *cells]:
        by_key.setdefault(cell.key, entries[id(cell)])
    rows = []
    for cell in [*extra, *cells]:
        entry = entries[id(cell)]
        base = by_key.get(cell.baseline_key) if cell.baseline_key else None
        if cell.is_baseline_only or base is None or cell.baseline_key == cell.key:
            entry["comparison"] = None
        elif not entry["scores"] or not base["scores"]:   # nothing to pair (e.g. no candidate kept the budget)
            entry["comparison"] = None
            if (base.get("tuning") or {}).get("over_budget"):
                entry["comparison_note"] = "its baseline has no candidate within the budget"
        else:
            comp = stats.paired_difference(entry["scores"], base["scores"], spec.confidence, spec.ci,
                                           higher_better=stats.higher_is_better(spec.metric))
            for scores, name in (("forgetting_scores", "forgetting"), ("kl_scores", "reference_kl")):
                if scores in entry and scores in base:
                    comp[name] = stats.paired_difference(entry[scores], base[scores], spec.confidence, spec.ci,
                                                         higher_better=False)
            mine = (entry.get("compute") or {}).get("train_flops")
            theirs = (base.get("compute") or {}).get("train_flops")
            comp["flops_ratio"] = mine / theirs if mine and theirs else None
            comp["equal_compute"] = abs(comp["flops_ratio"] - 1.0) <= 0.01 if comp["flops_ratio"] else None
            comp["baseline"] = cell.baseline_label
            entry["comparison"] = comp
        rows.append(entry)
    return rows


