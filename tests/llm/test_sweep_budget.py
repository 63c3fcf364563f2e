"""``cola sweep --max-forgetting / --max-kl``: each cell's pick is its best candidate within a forgetting
budget (a candidate built to forget is excluded; a cell with none says so and is not reported); ties go to
less forgetting; LR refinement (log-midpoints, one step beyond an edge, ``auto:LOW:HIGH``); picking the step
of a trajectory; and a tiny budgeted sweep run to the end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cola.errors import ConfigError
from cola.io import write_json
from cola.llm.sweep import cli as sweep_cli, frontiers as sweep_frontiers, tuning as sweep_tuning
from cola.llm.sweep import run_sweep
from cola.llm.sweep.cells import build_cells
from cola.llm.sweep.spec import SweepSpec, auto_values

FACTS = dict(model="tiny", task="facts", train_file="synthetic:8", n_test=4, steps=6, batch_size=2, eval_batch_size=4,
             rank=2, lr=5e-3)


def _fake_run(out: Path, key: str, seed: int, final: dict, trajectory: list[tuple[int, dict]] | None = None) -> None:
    """A finished run's results.json holding only what the tuning reads."""
    run = {"curve": [{"step": 0, "validation": {}}, {"step": 6, "validation": final}]}
    if trajectory is not None:
        run["trajectory"] = [{"step": 0, "validation": {}}] + [{"step": s, "validation": v} for s, v in trajectory]
    write_json(out / "runs" / key / f"seed{seed}" / "results.json", {"status": "complete", "runs": [run]})


def _groups(spec: SweepSpec):
    cells, extra = build_cells(spec)
    return cells, extra, sweep_tuning.candidates(spec, cells, extra)


def test_the_budget_excludes_a_candidate_built_to_forget(tmp_path):
    spec = SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2, 1e-1]}, tune_seeds=[7],
                     seeds=[0], max_forgetting=0.3)
    cells, _, groups = _groups(spec)
    group = groups[cells[0].key]
    scores = {1e-3: (0.2, 0.05), 1e-2: (0.6, 0.25), 1e-1: (0.9, 2.5)}   # (recall, forgetting): 0.1 forgets 2.5
    for cand in group:
        recall, forgot = scores[cand.values["lr"]]
        _fake_run(tmp_path, cand.key, 7, {"recall": recall, "answer_loss": 1.0, "forgetting": forgot,
                                          "reference_kl": forgot})
    record = sweep_tuning.choose(spec, tmp_path, group)
    assert record["chosen"]["values"] == {"lr": 1e-2}               # not 0.1, which recalls more but forgets 2.5
    assert [c["admissible"] for c in record["candidates"]] == [True, True, False]
    assert record["budget"] == {"forgetting": 0.3} and not record["over_budget"]
    unconstrained = SweepSpec(**{**spec.to_dict(), "max_forgetting": None})
    assert sweep_tuning.choose(unconstrained, tmp_path, group)["chosen"]["values"] == {"lr": 1e-1}
    kl_bound = SweepSpec(**{**spec.to_dict(), "max_forgetting": None, "max_kl": 0.1})
    assert sweep_tuning.choose(kl_bound, tmp_path, group)["chosen"]["values"] == {"lr": 1e-3}
    # nothing within the budget: said so, never the unconstrained best
    tight = SweepSpec(**{**spec.to_dict(), "max_forgetting": 0.01})
    record = sweep_tuning.choose(tight, tmp_path, group)
    assert record["chosen"] is None and record["over_budget"]
    assert record["least_forgetting"]["values"] == {"lr": 1e-3} and "no candidate within the budget" in record["note"]
    assert sweep_tuning.chosen_text(record) == "none within the budget"


def test_equal_recall_goes_to_the_candidate_that_forgot_less(tmp_path):
    spec = SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2]}, tune_seeds=[7], seeds=[0])
    cells, _, groups = _groups(spec)
    group = groups[cells[0].key]
    for cand, forgot, loss in zip(group, (0.9, 0.2), (0.1, 0.5)):      # the lower answer loss forgot more
        _fake_run(tmp_path, cand.key, 7, {"recall": 1.0, "answer_loss": loss, "forgetting": forgot})
    assert sweep_tuning.choose(spec, tmp_path, group)["chosen"]["values"] == {"lr": 1e-2}


def test_refinement_adds_log_midpoints_and_steps_beyond_an_edge(tmp_path):
    spec = SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2, 1e-1]}, tune_seeds=[7],
                     seeds=[0], refine=1)
    cells, _, groups = _groups(spec)
    key = cells[0].key
    for cand, recall in zip(groups[key], (0.2, 0.8, 0.5)):
        _fake_run(tmp_path, cand.key, 7, {"recall": recall, "answer_loss": 1.0})
    records = {k: sweep_tuning.choose(spec, tmp_path, g) for k, g in groups.items()}
    refined = sweep_tuning.refine(spec, groups, records)
    assert sorted(c.values["lr"] for c in refined[key]) == [1e-3, 0.00316, 1e-2, 0.0316, 1e-1]
    assert all("(refined)" in c.label for c in refined[key][3:])
    # a pick at the edge of the list: one step beyond it; an auto axis stays inside its bounds
    for cand, recall in zip(groups[key], (0.2, 0.5, 0.9)):
        _fake_run(tmp_path, cand.key, 7, {"recall": recall, "answer_loss": 1.0})
    records = {k: sweep_tuning.choose(spec, tmp_path, g) for k, g in groups.items()}
    assert records[key]["at_edge"] == ["lr"] and "(edge)" in sweep_tuning.chosen_text(records[key])
    refined = sweep_tuning.refine(spec, groups, records)
    assert sorted(c.values["lr"] for c in refined[key]) == [1e-3, 1e-2, 0.0316, 1e-1, 1.0]
    bounded = SweepSpec(**{**spec.to_dict(), "tune": {"lr": "auto:1e-3:1e-1:3"}})
    assert bounded.tune["lr"] == [1e-3, 1e-2, 1e-1] and bounded.tune_bounds == {"lr": [1e-3, 1e-1]}
    refined = sweep_tuning.refine(bounded, groups, records)
    assert sorted(c.values["lr"] for c in refined[key]) == [1e-3, 1e-2, 0.0316, 1e-1]


def test_auto_axes_are_log_spaced_and_refined_twice_by_default():
    values, bounds = auto_values("auto:1e-4:1e-2")
    assert values == [1e-4, 0.000464, 0.00215, 1e-2] and bounds == (1e-4, 1e-2)
    spec = SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": ["auto:1e-4:1e-2"]}, seeds=[0])
    assert spec.refine_rounds == 2 and SweepSpec(**spec.to_dict()).refine_rounds == 2   # survives a save
    assert SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2]}).refine_rounds == 0
    for bad in ("auto:1e-2:1e-4", "auto:x:1", "auto:1e-4:1e-2:1"):
        with pytest.raises(ConfigError, match="auto:LOW:HIGH"):
            SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [bad]})


def test_budget_specs_are_checked():
    with pytest.raises(ConfigError, match="a budget chooses among tuning candidates"):
        SweepSpec(settings=dict(FACTS), grid={"links": [2]}, max_forgetting=0.3)
    with pytest.raises(ConfigError, match="max_kl=-1"):
        SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2]}, max_kl=-1)
    with pytest.raises(ConfigError, match="measures no forgetting"):
        SweepSpec(settings={**FACTS, "task": "sst2", "train_file": None}, grid={"links": [2]},
                  tune={"lr": [1e-3, 1e-2]}, max_forgetting=0.3)
    with pytest.raises(ConfigError, match="set eval_every"):
        SweepSpec(settings=dict(FACTS), grid={"links": [2]}, tune={"lr": [1e-3, 1e-2]}, tune_step=True)


def test_the_step_of_a_trajectory_is_picked_and_the_report_runs_end_there(tmp_path):
    spec = SweepSpec(settings={**FACTS, "eval_every": 2}, grid={"links": [2]}, tune={"lr": [1e-3, 1e-1]},
                     tune_seeds=[7], seeds=[0], max_forgetting=0.3, tune_step=True)
    cells, extra, groups = _groups(spec)
    key = cells[0].key
    slow, fast = groups[key]
    _fake_run(tmp_path, slow.key, 7, {}, [(2, {"recall": 0.1, "forgetting": 0.0}), (4, {"recall": 0.2, "forgetting": 0.1}),
                                         (6, {"recall": 0.3, "forgetting": 0.1})])
    _fake_run(tmp_path, fast.key, 7, {}, [(2, {"recall": 0.5, "forgetting": 0.2}), (4, {"recall": 0.9, "forgetting": 0.9}),
                                         (6, {"recall": 1.0, "forgetting": 2.0})])
    record = sweep_tuning.choose(spec, tmp_path, groups[key])
    assert record["chosen"]["values"] == {"lr": 1e-1} and record["chosen"]["step"] == 2   # the checkpoint in budget
    assert [p["admissible"] for p in record["candidates"][1]["steps"]] == [True, False, False]
    assert sweep_tuning.chosen_text(record) == "lr=0.1 (edge) at step 2"
    records = {k: sweep_tuning.choose(spec, tmp_path, g) for k, g in groups.items()}
    tuned, _ = sweep_tuning.apply(cells, extra, groups, records)
    assert tuned[0].settings.end_at_step == 2 and tuned[0].settings.lr == 1e-1 and tuned[0].key != fast.key
    lines = "\n".join(sweep_frontiers.frontier_lines({"spec": spec.to_dict(), "cells": [
        {"label": "c", "key": key, "tuning": record}]}))
    assert "**picked**" in lines and "| 2 |" in lines


def test_the_command_line_takes_the_budget_flags(tmp_path):
    parser = argparse.ArgumentParser()
    sweep_cli.add_arguments(parser)
    args = parser.parse_args(["--task", "facts", "--train-file", "synthetic:8", "--links", "1", "2", "--tune",
                              "lr=auto:1e-3:1e-1", "--max-forgetting", "0.3", "--max-kl", "0.5", "--tune-refine", "1",
                              "--seeds", "0", "--output-dir", str(tmp_path / "x")])
    spec = sweep_cli.spec_from_args(args)
    assert spec.max_forgetting == 0.3 and spec.max_kl == 0.5 and spec.refine_rounds == 1
    assert spec.tune["lr"] == [1e-3, 0.00464, 0.0215, 0.1]
    assert json.loads(json.dumps(spec.to_dict()))["max_forgetting"] == 0.3


def test_a_budgeted_sweep_runs_to_the_end_and_says_what_kept_the_budget(tmp_path, tok, make_model):
    reference = tmp_path / "reference.txt"
    reference.write_text("\n\n".join(f"It was great. Yes, no, maybe {i}." for i in range(80)))
    settings = {**FACTS, "reference_file": str(reference), "eval_every": 3}   # the sweep's plots, not its runs'
    spec = SweepSpec(settings=settings, grid={"links": [2]}, seeds=[0], tune={"lr": [1e-4, 3e-2]}, tune_seeds=[100],
                     max_forgetting=1e9, refine=1, tune_step=True)
    out = tmp_path / "sweep"
    results = run_sweep(spec, out, loader=lambda: (make_model("llama"), tok))
    assert results["status"] == "complete"
    for row in results["cells"]:
        tuning = row["tuning"]
        assert tuning["chosen"] and len(tuning["candidates"]) == 4     # two, then two refined around the pick
        assert row["budget_check"]["kept"] and "reference_kl" in row
    text = (out / "results.md").read_text()
    assert "**Forgetting budget: forgetting <= 1e+09 nats**" in text and "Frontiers (" in text
    assert "kept on every seed" in text and (out / "tuning_frontiers.png").is_file()
    # a budget nothing can keep: no report run, said so in every file
    strict = SweepSpec(**{**spec.to_dict(), "settings": {**settings, "plots": False}, "max_forgetting": 0.0,
                          "max_kl": 0.0, "refine": 0})
    results = run_sweep(strict, tmp_path / "strict", loader=lambda: (make_model("llama"), tok))
    assert results["status"] == "complete"
    assert all(r["tuning"]["over_budget"] and r["score"]["n"] == 0 for r in results["cells"])
    assert "none within the budget" in (tmp_path / "strict" / "results.md").read_text()
    assert not any((tmp_path / "strict" / "runs").glob("*/seed0"))
