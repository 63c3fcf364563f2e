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
from cola.llm.sweep_cells import Cell, cell_settings, run_key
from cola.llm.sweep_results import read_json
from cola.llm.sweep_spec import SweepSpec, label_of

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
    """The (candidate, tuning seed) runs, seed by seed; none for a cell with a single candidate."""
    units, seen = [], set()
    for seed in spec.tune_seeds:
        for group in groups.values():
            for cand in group if len(group) > 1 else []:
                if (cand.key, seed) not in seen:
                    seen.add((cand.key, seed))
                    units.append((cand, seed))
    return units


def _validation_score(out: Path, key: str, seed: int, metric: str) -> tuple[float, float | None] | None:
    """``(metric, tie-break)`` on the validation split after the last link of a finished run, or None."""
    results = read_json(out / "runs" / key / f"seed{seed}" / "results.json")
    if not results or results.get("status") != "complete" or not results.get("runs"):
        return None
    curve = results["runs"][0].get("curve") or []
    if not curve or metric not in curve[-1]["validation"]:
        return None
    last = curve[-1]["validation"]
    tie = last.get(TIE_BREAK.get(metric, "loss"))
    value = last[metric]  # a diverged run's NaN is written as null
    return float(value) if value is not None else math.nan, float(tie) if tie is not None else None


def choose(spec: SweepSpec, out: Path, group: list[Cell]) -> dict[str, Any]:
    """The tuning record of one cell: every candidate's validation scores and the one chosen (None
    while a candidate has a tuning run to finish)."""
    metric = spec.metric
    higher = stats.higher_is_better(metric)
    axes = [a for a in spec.tune if _varies(group, a)] or list(spec.tune)  # those that change this cell's run
    record: dict[str, Any] = {"axes": {a: list(spec.tune[a]) for a in axes}, "seeds": list(spec.tune_seeds),
                              "metric": f"validation {metric} after the last link", "candidates": [],
                              "chosen": None, "tuned": len(group) > 1, "complete": True, "at_edge": []}
    if len(group) == 1:
        record["chosen"] = {"values": {a: group[0].values.get(a) for a in axes}, "key": group[0].key}
        record["note"] = f"not tuned: every value of {', '.join(axes)} gives the same run"
        return record
    ranked = []
    for index, cand in enumerate(group):
        scores = {seed: _validation_score(out, cand.key, seed, metric) for seed in spec.tune_seeds}
        done = {s: v for s, v in scores.items() if v is not None}
        entry = {"values": {a: cand.values.get(a) for a in axes}, "key": cand.key,
                 "scores": {str(s): v[0] for s, v in done.items()}, "mean": None, "tie_break": None}
        if len(done) == len(scores):
            mean = sum(v[0] for v in done.values()) / len(done)
            ties = [v[1] for v in done.values() if v[1] is not None]
            entry["mean"] = mean
            entry["tie_break"] = sum(ties) / len(ties) if len(ties) == len(done) else None
            if math.isfinite(mean):
                tie = entry["tie_break"] if entry["tie_break"] is not None and math.isfinite(entry["tie_break"]) \
                    else math.inf
                ranked.append(((-mean if higher else mean), tie, index))
        else:
            record["complete"] = False
        record["candidates"].append(entry)
    if not record["complete"] or not ranked:
        record["note"] = "tuning runs unfinished" if not record["complete"] else "no candidate gave a finite score"
        return record
    best = group[min(ranked)[2]]
    record["chosen"] = {"values": {a: best.values.get(a) for a in axes}, "key": best.key}
    record["at_edge"] = [a for a in axes if len(spec.tune[a]) > 1
                         and best.values.get(a) in (spec.tune[a][0], spec.tune[a][-1])]
    return record


def _varies(group: list[Cell], axis: str) -> bool:
    return len({repr(c.values.get(axis)) for c in group}) > 1


def apply(cells: list[Cell], extra: list[Cell], groups: dict[str, list[Cell]],
          records: dict[str, dict[str, Any]]) -> tuple[list[Cell], list[Cell]]:
    """The cells and baselines at their chosen values (those whose tuning is unfinished as they were), each
    with its tuning record, their baseline keys following their baselines' choices."""
    chosen = {}
    for key, group in groups.items():
        pick = (records[key].get("chosen") or {}).get("key")
        chosen[key] = next((c for c in group if c.key == pick), None)

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
    """``lr=0.005`` (``lr=0.005 (edge)`` at the end of its list; ``–`` untuned; ``pending`` unfinished)."""
    if not tuning:
        return "–"
    if not tuning.get("tuned"):
        return "(one run)"
    if not tuning.get("chosen"):
        return "pending"
    return " ".join(f"{a}={_value_text(v)}" + (" (edge)" if a in tuning["at_edge"] else "")
                    for a, v in tuning["chosen"]["values"].items())


def statement(spec: dict[str, Any]) -> str:
    """The line that says whether the arms of a comparison each had their best values."""
    if not spec.get("tune"):
        return ("**Not tuned:** every cell runs at the learning rate its settings give. Arms whose best LR differs "
                "are compared at one LR, so a difference may be the LR's rather than the method's "
                "(cola sweep --tune lr=V1,V2,... picks each cell's own).")
    axes = "; ".join(f"{a} in {', '.join(map(_value_text, v))}" for a, v in spec["tune"].items())
    return (f"**Tuned per cell:** every cell and every baseline picked its own {axes} by the validation "
            f"{spec['metric']} after the last link on tuning seeds {', '.join(map(str, spec['tune_seeds']))} "
            f"(never the report seeds {', '.join(map(str, spec['seeds']))}); the choice is in the column `tuned`, "
            "\"(edge)\" when it is the first or last value (the best may lie outside the list).")


def tuning_lines(results: dict[str, Any]) -> list[str]:
    """The table of every tuned cell's candidates and their validation scores."""
    rows, seen = [], set()
    for row in results["cells"]:
        tuning = row.get("tuning")
        if not tuning or not tuning.get("tuned") or row["key"] in seen:
            continue
        seen.add(row["key"])
        scores = " · ".join(
            f"{' '.join(_value_text(v) for v in c['values'].values())}: "
            + ("–" if c["mean"] is None else f"{c['mean']:.4f}") for c in tuning["candidates"])
        rows.append([row["label"], scores, chosen_text(tuning)])
    if not rows:
        return []
    axes = ", ".join(results["spec"]["tune"])
    return [f"Tuning ({axes}: validation {results['spec']['metric']} of each candidate, mean over the tuning "
            "seeds; ties broken by the validation loss):", "",
            markdown_table(["cell", "candidates", "chosen"], rows), ""]
