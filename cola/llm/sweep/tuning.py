"""Tuning a sweep's cells before scoring them: each cell (and each baseline) at its own best LR.

A comparison of methods at one learning rate measures the LR as much as the method: independent
studies find that once every arm has its own tuned LR, most LoRA variants land within a point or two
of plain LoRA (``reference/capacity.md``). ``cola sweep --tune lr=1e-3,2e-3,5e-3`` (a sweep file's
``[tune]`` table) makes every cell pick its value first:

1. every *candidate* (the cell with one combination of the tuned values) is trained on each
   *tuning seed* (``tune_seeds``, disjoint from the report ``seeds``: each seed draws its own
   training/validation sample, init and data order), an ordinary run in ``runs/<key>/seed<k>/``;
2. its score is the *validation* metric after the last link (``curve[-1]``; the sweep's metric
   measured on the validation split), averaged over the tuning seeds; ties (recall or accuracy
   saturating at 1) are broken by the validation loss (``answer_loss`` of the facts task, ``loss``
   otherwise), then by the order of the candidates;
3. the best candidate is the cell: it is trained on the report seeds, scored on the test split and
   compared, paired by seed, with its baseline, which was tuned the same way on its own.

Candidates that compute the same run collapse (full fine-tuning ignores ``lr``: tune ``full_lr``
for it); a cell with one candidate is not tuned and says so. A chosen value at the edge of its list
is flagged: the best value may lie outside it. The report seeds never see a tuning run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from cola.io import markdown_table
from cola.llm import stats
from cola.llm.sweep.cells import Cell, cell_settings, run_key
from cola.llm.sweep.results import read_json
from cola.llm.sweep.spec import SweepSpec, label_of, round_value

#: the tie-break of a tuning score: a validation loss (lower is better) that does not saturate
TIE_BREAK = {"recall": "answer_loss", "token_accuracy": "answer_loss", "paraphrase_recall": "answer_loss"}


def combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the tuned values, in order (the last axis varies fastest)."""
    axes = list(spec.tune)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(spec.tune[a] for a in axes))]


def candidates(spec: SweepSpec, cells: list[Cell], extra: list[Cell]) -> dict[str, list[Cell]]:
    """Per (untuned) run key of the cells and baselines: its candidates, one per distinct run."""
    groups: dict[str, list[Cell]] = {}
    for cell in [*extra, *cells]:
        if cell.key in groups:
            continue
        found: dict[str, tuple[dict[str, Any], Cell]] = {}
        for combo in combinations(spec):
            values = {**cell.values, **combo}
            settings = cell_settings(spec, values)
            key = run_key(settings)
            if key not in found:
                found[key] = (combo, Cell(values, "", settings, key, is_baseline_only=True))
        varying = [a for a in spec.tune if len({repr(combo[a]) for combo, _ in found.values()}) > 1]
        groups[cell.key] = [replace(cand, label=f"tuning {cell.label}: {label_of({a: combo[a] for a in varying})}")
                            for combo, cand in found.values()]
    return groups


def tuning_units(spec: SweepSpec, groups: dict[str, list[Cell]]) -> list[tuple[Cell, int]]:
    """The (candidate, tuning seed) runs, seed by seed; none for a cell with a single candidate, unless a
    budget or the step is to be checked on it (then its one candidate is run on the tuning seeds too)."""
    units, seen = [], set()
    checked = bool(spec.budget) or spec.tune_step
    for seed in spec.tune_seeds:
        for group in groups.values():
            for cand in group if len(group) > 1 or checked else []:
                if (cand.key, seed) not in seen:
                    seen.add((cand.key, seed))
                    units.append((cand, seed))
    return units


def _run_points(out: Path, key: str, seed: int, every_step: bool) -> list[tuple[int, dict[str, Any]]] | None:
    """``[(step, validation scores)]`` of a finished run: after its last link (the curve's last point, else the
    trajectory's), or with ``every_step`` every point of its trajectory after step 0; None while unfinished."""
    results = read_json(out / "runs" / key / f"seed{seed}" / "results.json")
    if not results or results.get("status") != "complete" or not results.get("runs"):
        return None
    run = results["runs"][0]
    trajectory = [p for p in run.get("trajectory") or [] if p["step"] > 0]
    if every_step:
        return [(p["step"], p["validation"]) for p in trajectory]
    curve = run.get("curve") or []
    if len(curve) > 1:
        return [(curve[-1].get("step"), curve[-1]["validation"])]
    return [(trajectory[-1]["step"], trajectory[-1]["validation"])] if trajectory else []


def _number(value: Any) -> float | None:
    return None if value is None else float(value)   # a diverged run's NaN is written as null


def _mean(values: list[float | None]) -> float | None:
    """The mean, None when any value is missing (NaN when any is NaN)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _scored(spec: SweepSpec, points: dict[int, list[tuple[int, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per step that every tuning seed scored: the means over the seeds of the metric, the forgetting, the KL to
    the start and the tie-break loss, and whether it keeps the budget."""
    metric = spec.metric
    steps = sorted(set.intersection(*(set(step for step, _ in p) for p in points.values())),
                   key=lambda x: (x is None, x or 0)) if points else []
    out = []
    for step in steps:
        at = [dict(p)[step] for p in points.values()]
        entry = {"step": step, "mean": _mean([_number(v.get(metric)) for v in at]),
                 "scores": {str(s): _number(dict(p)[step].get(metric)) for s, p in points.items()},
                 "forgetting": _mean([_number(v.get("forgetting")) for v in at]),
                 "reference_kl": _mean([_number(v.get("reference_kl")) for v in at]),
                 "tie_break": _mean([_number(v.get(TIE_BREAK.get(metric, "loss"))) for v in at])}
        entry["admissible"] = within_budget(spec.budget, entry)
        out.append(entry)
    return out


def within_budget(budget: dict[str, float], scores: dict[str, Any]) -> bool:
    """Whether ``scores`` keep every budget (a missing or non-finite measure does not)."""
    for measure, bound in budget.items():
        value = scores.get(measure)
        if value is None or not math.isfinite(value) or value > bound:
            return False
    return True


def _rank_key(spec: SweepSpec, point: dict[str, Any], index: int) -> tuple:
    """Best first: the metric, then less forgetting (equal recall: the model that lost less), then the loss. At
    zero recall (or accuracy) the loss comes before the forgetting: a candidate that learnt nothing forgets least
    and would always win that tie."""
    higher = stats.higher_is_better(spec.metric)
    forgetting = point["forgetting"] if point["forgetting"] is not None and math.isfinite(point["forgetting"]) \
        else math.inf
    tie = point["tie_break"] if point["tie_break"] is not None and math.isfinite(point["tie_break"]) else math.inf
    first, second = (tie, forgetting) if higher and point["mean"] == 0 else (forgetting, tie)
    return (-point["mean"] if higher else point["mean"]), first, second, index, point["step"] or 0


def choose(spec: SweepSpec, out: Path, group: list[Cell]) -> dict[str, Any]:
    """The tuning record of one cell: every candidate's validation scores (and, with ``tune_step``, those of every
    step of its trajectory), which keep the budget, and the one chosen (None while a candidate has a tuning run to
    finish, or when none keeps the budget: then ``over_budget``)."""
    axes = [a for a in spec.tune if _varies(group, a)] or list(spec.tune)  # those that change this cell's run
    budget = spec.budget
    record: dict[str, Any] = {"axes": {a: sorted({c.values.get(a) for c in group}, key=_order) for a in axes},
                              "seeds": list(spec.tune_seeds), "budget": budget, "tune_step": spec.tune_step,
                              "metric": f"validation {spec.metric} after the last link"
                                        + (" or at any step of the trajectory" if spec.tune_step else ""),
                              "candidates": [], "chosen": None, "tuned": len(group) > 1, "complete": True,
                              "at_edge": [], "over_budget": False}
    if len(group) == 1 and not (budget or spec.tune_step):
        record["chosen"] = {"values": {a: group[0].values.get(a) for a in axes}, "key": group[0].key, "step": None}
        record["note"] = f"not tuned: every value of {', '.join(axes)} gives the same run"
        return record
    ranked = []
    for index, cand in enumerate(group):
        points = {seed: _run_points(out, cand.key, seed, spec.tune_step) for seed in spec.tune_seeds}
        entry: dict[str, Any] = {"values": {a: cand.values.get(a) for a in axes}, "key": cand.key, "scores": {},
                                 "mean": None, "forgetting": None, "reference_kl": None, "tie_break": None,
                                 "admissible": None}
        if any(p is None for p in points.values()):
            record["complete"] = False
            record["candidates"].append(entry)
            continue
        scored = _scored(spec, points)
        last = scored[-1] if scored else None
        if last is not None:
            entry.update({k: last[k] for k in ("scores", "mean", "forgetting", "reference_kl", "tie_break",
                                               "admissible")})
        if spec.tune_step:
            entry["steps"] = [{k: p[k] for k in ("step", "mean", "forgetting", "reference_kl", "admissible")}
                              for p in scored]
        for point in scored if spec.tune_step else scored[-1:]:
            if point["mean"] is not None and math.isfinite(point["mean"]) and point["admissible"]:
                ranked.append((_rank_key(spec, point, index), index, {**point, "last": point is scored[-1]}))
        record["candidates"].append(entry)
    if not record["complete"]:
        record["note"] = "tuning runs unfinished"
        return record
    if not ranked:
        finite = [c for c in record["candidates"] if c["mean"] is not None and math.isfinite(c["mean"])]
        if budget and finite:
            record["over_budget"] = True
            least = min(finite, key=lambda c: _excess(c, budget))
            record["least_forgetting"] = {k: least[k] for k in ("values", "key", "mean", "forgetting",
                                                                "reference_kl")}
            record["note"] = f"no candidate within the budget ({budget_text(budget)})"
        else:
            record["note"] = "no candidate gave a finite score"
        return record
    _, index, point = min(ranked, key=lambda r: r[0])
    best = group[index]
    record["chosen"] = {"values": {a: best.values.get(a) for a in axes}, "key": best.key,
                        "step": point["step"] if spec.tune_step and not point["last"] else None,
                        **{k: point[k] for k in ("mean", "forgetting", "reference_kl")}}
    record["at_edge"] = [a for a in axes if len(record["axes"][a]) > 1
                         and best.values.get(a) in (record["axes"][a][0], record["axes"][a][-1])]
    return record


def _excess(candidate: dict[str, Any], budget: dict[str, float]) -> float:
    """How far past its budgets a candidate is: the largest ratio of a measure to its budget."""
    worst = 0.0
    for measure, bound in budget.items():
        value = candidate.get(measure)
        value = math.inf if value is None or not math.isfinite(value) else value
        worst = max(worst, value / bound if bound > 0 else value)
    return worst


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, repr(value))


def budget_text(budget: dict[str, float]) -> str:
    """``forgetting <= 0.3 nats, KL <= 0.5``."""
    names = {"forgetting": "forgetting", "reference_kl": "KL to the start"}
    return ", ".join(f"{names[m]} <= {b:g}" + (" nats" if m == "forgetting" else "") for m, b in budget.items())


# ============================================================================ refinement

def refine(spec: SweepSpec, groups: dict[str, list[Cell]], records: dict[str, dict[str, Any]]
           ) -> dict[str, list[Cell]]:
    """The groups with the candidates of one more round of refinement: around each cell's best candidate (or,
    when none keeps the budget, the one that forgets least), for every numeric tuned axis that changes its run,
    the values log-midway between it and its neighbours on that axis, and one step beyond it when it is the first
    or last value (inside the bounds of an ``auto:LOW:HIGH`` axis). Deterministic, so a resumed sweep refines
    alike."""
    refined = {}
    for key, group in groups.items():
        record = records.get(key) or {}
        anchor_key = ((record.get("chosen") or {}).get("key")
                      or (record.get("least_forgetting") or {}).get("key"))
        anchor = next((c for c in group if c.key == anchor_key), None)
        if anchor is None or len(group) == 1:
            refined[key] = group
            continue
        new = list(group)
        known = {c.key for c in group}
        for axis in (a for a in spec.tune if _varies(group, a)):
            value = anchor.values.get(axis)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, int):
                continue   # only real-valued axes (learning rates) are refined
            others = {a: v for a, v in anchor.values.items() if a != axis}
            line = sorted({c.values[axis] for c in group if all(c.values.get(a) == v for a, v in others.items())})
            for candidate_value in _between(line, value, spec.tune_bounds.get(axis)):
                values = {**anchor.values, axis: candidate_value}
                settings = cell_settings(spec, values)
                run = run_key(settings)
                if run in known:
                    continue
                known.add(run)
                label = group[0].label.split(":", 1)[0]
                new.append(Cell(values, f"{label}: {label_of({axis: candidate_value})} (refined)", settings, run,
                                is_baseline_only=True))
        refined[key] = new
    return refined


def _between(line: list[float], value: float, bounds: list[float] | None) -> list[float]:
    """New values around ``value`` on the sorted ``line`` of values tried (log-midpoints, one step beyond an end)."""
    i = line.index(value)
    out = []
    if i > 0:
        out.append(round_value(math.sqrt(line[i - 1] * value)))
    elif len(line) > 1 and value > 0:
        out.append(round_value(value * value / line[1]))
    if i < len(line) - 1:
        out.append(round_value(math.sqrt(value * line[i + 1])))
    elif len(line) > 1 and value > 0:
        out.append(round_value(value * value / line[-2]))
    if bounds is not None:
        out = [v for v in out if bounds[0] <= v <= bounds[1]]
    return [v for v in out if v > 0 and v not in line]


def _varies(group: list[Cell], axis: str) -> bool:
    return len({repr(c.values.get(axis)) for c in group}) > 1


def apply(cells: list[Cell], extra: list[Cell], groups: dict[str, list[Cell]],
          records: dict[str, dict[str, Any]]) -> tuple[list[Cell], list[Cell]]:
    """The cells and baselines at their chosen values (those whose tuning is unfinished as they were), each
    with its tuning record, their baseline keys following their baselines' choices."""
    chosen = {}
    for key, group in groups.items():
        choice = records[key].get("chosen") or {}
        pick = next((c for c in group if c.key == choice.get("key")), None)
        if pick is not None and choice.get("step"):   # the checkpoint picked: the report runs end there
            settings = pick.settings.replace(end_at_step=choice["step"])
            pick = replace(pick, settings=settings, key=run_key(settings))
        chosen[key] = pick

    def tuned(cell: Cell) -> Cell:
        pick = chosen.get(cell.key)
        new_base = chosen.get(cell.baseline_key) if cell.baseline_key else None
        base_key = new_base.key if new_base is not None else cell.baseline_key
        if pick is None:
            return replace(cell, baseline_key=base_key, tuning=records[cell.key])
        return replace(cell, settings=pick.settings, key=pick.key, baseline_key=base_key, tuning=records[cell.key])

    return [tuned(c) for c in cells], [tuned(c) for c in extra]


# ============================================================================ what the report says

def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def chosen_text(tuning: dict[str, Any] | None) -> str:
    """``lr=0.005`` (``lr=0.005 (edge)`` at the end of the values tried, `` at step 80`` for a picked checkpoint;
    ``–`` untuned; ``pending`` unfinished; ``none within the budget``)."""
    if not tuning:
        return "–"
    if tuning.get("over_budget"):
        return "none within the budget"
    if not tuning.get("tuned") and not tuning.get("budget") and not tuning.get("tune_step"):
        return "(one run)"
    if not tuning.get("chosen"):
        return "pending"
    text = " ".join(f"{a}={_value_text(v)}" + (" (edge)" if a in tuning["at_edge"] else "")
                    for a, v in tuning["chosen"]["values"].items()) if tuning.get("tuned") else "(one run)"
    step = tuning["chosen"].get("step")
    return text + (f" at step {step}" if step else "")


def statement(spec: dict[str, Any]) -> str:
    """The lines that say whether the arms of a comparison each had their best values, and under which budget."""
    if not spec.get("tune"):
        return ("**Not tuned:** every cell runs at the learning rate its settings give. Arms whose best LR differs "
                "are compared at one LR, so a difference may be the LR's rather than the method's "
                "(cola sweep --tune lr=V1,V2,... picks each cell's own).")
    axes = "; ".join(f"{a} in {', '.join(map(_value_text, v))}" for a, v in spec["tune"].items())
    rounds = spec.get("refine") or 0
    refined = (f", refined {rounds} time{'s' if rounds > 1 else ''} around the best (log-midpoints, one step beyond "
               "an end)" if rounds else "")
    step = " and the step of its trajectory (a checkpoint: its report runs end there)" if spec.get("tune_step") else ""
    text = (f"**Tuned per cell:** every cell and every baseline picked its own {axes}{refined}{step} by the validation "
            f"{spec['metric']} after the last link on tuning seeds {', '.join(map(str, spec['tune_seeds']))} "
            f"(never the report seeds {', '.join(map(str, spec['seeds']))}); ties go to the candidate that forgot "
            "less; the choice is in the column `tuned`, \"(edge)\" when it is the first or last value tried (the best "
            "may lie outside them).")
    budget = {k: v for k, v in (("forgetting", spec.get("max_forgetting")), ("reference_kl", spec.get("max_kl")))
              if v is not None}
    if budget:
        text += (f"\n\n**Forgetting budget: {budget_text(budget)}** (validation, mean over the tuning seeds): each "
                 "cell's pick is its best candidate within the budget; a cell with none is reported as such, never "
                 "at its unconstrained best.")
    else:
        text += ("\n\n**No forgetting budget:** each cell's pick is its best candidate however much it forgot (the "
                 "forgetting columns say how much).")
    return text


def _fmt(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tuning_lines(results: dict[str, Any]) -> list[str]:
    """The table of every tuned cell's candidates and their validation scores (and, under a budget, forgetting)."""
    rows, seen = [], set()
    budget = bool(results["spec"].get("max_forgetting") is not None or results["spec"].get("max_kl") is not None)
    for row in results["cells"]:
        tuning = row.get("tuning")
        if not tuning or not (tuning.get("tuned") or tuning.get("budget")) or row["key"] in seen:
            continue
        seen.add(row["key"])
        parts = []
        for c in tuning["candidates"]:
            text = f"{' '.join(_value_text(v) for v in c['values'].values())}: {_fmt(c['mean'])}"
            if budget or c.get("forgetting") is not None:
                text += f" (forgot {_fmt(c.get('forgetting'), 2)}" + (
                    ", over" if budget and c.get("admissible") is False else "") + ")"
            parts.append(text)
        rows.append([row["label"], " · ".join(parts), chosen_text(tuning)])
    if not rows:
        return []
    axes = ", ".join(results["spec"]["tune"])
    return [f"Tuning ({axes}: validation {results['spec']['metric']} of each candidate after its last link, mean over "
            "the tuning seeds, with its forgetting; ties broken by less forgetting, then the validation loss):", "",
            markdown_table(["cell", "candidates", "chosen"], rows), ""]


#END
