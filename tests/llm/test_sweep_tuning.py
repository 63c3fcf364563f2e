"""``cola sweep --tune``: every cell and baseline at its own value, picked on the validation split of
tuning seeds that the report seeds never see; the choice in every results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cola.errors import ConfigError
from cola.io import write_json
from cola.llm.sweep import cli as sweep_cli, tuning as sweep_tuning
from cola.llm.sweep import run_sweep
from cola.llm.sweep.cells import Cell, build_cells
from cola.llm.sweep.spec import SweepSpec

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(model="tiny", task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4, steps=6, batch_size=2,
            eval_batch_size=4, rank=2, lr=5e-3)


def _fake_run(out: Path, key: str, seed: int, validation: dict) -> None:
    """A finished run's results.json holding only what the tuning reads."""
    write_json(out / "runs" / key / f"seed{seed}" / "results.json",
               {"status": "complete", "runs": [{"curve": [{"validation": {}}, {"validation": validation}]}]})


def _group(spec: SweepSpec) -> list[Cell]:
    cells, extra = build_cells(spec)
    groups = sweep_tuning.candidates(spec, cells, extra)
    return groups[cells[0].key]


def test_the_best_validation_score_wins_ties_broken_by_the_loss_and_edges_flagged(tmp_path):
    spec = SweepSpec(settings={**TINY, "task": "facts", "train_file": "synthetic:8", "data_dir": None},
                     grid={"links": [2]}, tune={"lr": [1e-3, 2e-3, 5e-3]}, tune_seeds=[100, 101], seeds=[0])
    group = _group(spec)
    assert [c.values["lr"] for c in group] == [1e-3, 2e-3, 5e-3]
    record = sweep_tuning.choose(spec, tmp_path, group)
    assert not record["complete"] and record["chosen"] is None        # nothing has run yet
    scores = {1e-3: (0.5, 1.0), 2e-3: (0.9, 0.8), 5e-3: (0.9, 0.5)}  # (recall, answer loss) on both seeds
    for cand in group:
        for seed in (100, 101):
            recall, loss = scores[cand.values["lr"]]
            _fake_run(tmp_path, cand.key, seed, {"recall": recall, "answer_loss": loss})
    record = sweep_tuning.choose(spec, tmp_path, group)
    assert record["chosen"]["values"] == {"lr": 5e-3}                # equal recall: the lower answer loss
    assert record["at_edge"] == ["lr"] and sweep_tuning.chosen_text(record) == "lr=0.005 (edge)"
    assert [c["mean"] for c in record["candidates"]] == [0.5, 0.9, 0.9]
    _fake_run(tmp_path, group[1].key, 101, {"recall": 1.0, "answer_loss": 0.9})   # 2e-3 now best on average
    record = sweep_tuning.choose(spec, tmp_path, group)
    assert record["chosen"]["values"] == {"lr": 2e-3} and record["at_edge"] == []


def test_lower_is_better_metrics_and_non_finite_candidates(tmp_path):
    spec = SweepSpec(settings={**TINY, "task": "facts", "train_file": "synthetic:8", "data_dir": None},
                     grid={"links": [2]}, tune={"lr": [1e-3, 1e-2, 1e-1]}, tune_seeds=[5], seeds=[0],
                     metric="answer_loss")
    group = _group(spec)
    _fake_run(tmp_path, group[0].key, 5, {"answer_loss": 0.7})
    _fake_run(tmp_path, group[1].key, 5, {"answer_loss": 0.9})
    _fake_run(tmp_path, group[2].key, 5, {"answer_loss": float("nan")})   # diverged: never chosen
    record = sweep_tuning.choose(spec, tmp_path, group)
    assert record["chosen"]["values"] == {"lr": 1e-3} and record["at_edge"] == ["lr"]


def test_a_full_fine_tuning_cell_collapses_lr_and_tunes_full_lr():
    spec = SweepSpec(settings=dict(TINY), grid={"method": ["full", "lora"]}, seeds=[0],
                     tune={"lr": [1e-3, 1e-2], "full_lr": [1e-5, 1e-4]})
    cells, extra = build_cells(spec)
    groups = sweep_tuning.candidates(spec, cells, extra)
    by_method = {c.settings.method: groups[c.key] for c in cells}
    assert sorted(c.settings.full_lr for c in by_method["full"]) == [1e-5, 1e-4]    # lr does not matter to it
    assert sorted(c.settings.lr for c in by_method["lora"]) == [1e-3, 1e-2]         # nor full_lr to LoRA
    assert len(sweep_tuning.tuning_units(spec, groups)) == 4


def test_tuning_specs_are_checked():
    with pytest.raises(ConfigError, match="must never see the tuning"):
        SweepSpec(settings=dict(TINY), grid={"links": [1, 2]}, tune={"lr": [1e-3, 1e-2]}, tune_seeds=[0, 9],
                  seeds=[0, 1])
    with pytest.raises(ConfigError, match="also set by the grid"):
        SweepSpec(settings=dict(TINY), grid={"lr": [1e-3, 1e-2]}, tune={"lr": [1e-3, 1e-2]})
    with pytest.raises(ConfigError, match="also set by the grid, a cell or the baseline"):
        SweepSpec(settings=dict(TINY), grid={"links": [2]}, baseline={"method": "lora", "lr": 1e-3},
                  tune={"lr": [1e-3, 1e-2]})
    with pytest.raises(ConfigError, match="non-empty list"):
        SweepSpec(settings=dict(TINY), grid={"links": [2]}, tune={"lr": []})
    with pytest.raises(ConfigError, match="not a cola train setting"):
        SweepSpec(settings=dict(TINY), grid={"links": [2]}, tune={"learning_rate": [1e-3]})


def test_a_tuned_sweep_picks_the_clearly_better_lr_and_reports_on_fresh_seeds(tmp_path, tok, make_model):
    """Facts on a tiny model: LR 1e-6 cannot move the answers in 6 steps, LR 3e-2 does; each cell (the
    chain and its LoRA baseline) picks 3e-2 on tuning seed 100 and is then run on seeds 0 and 1."""
    settings = {**TINY, "task": "facts", "train_file": "synthetic:8", "data_dir": None, "n_train": None,
                "n_val": None, "n_test": 4, "plots": False}
    reference = tmp_path / "reference.txt"
    reference.write_text("\n\n".join(f"It was great. Yes, no, maybe {i}." for i in range(80)))
    settings["reference_file"] = str(reference)
    spec = SweepSpec(settings=settings, grid={"links": [3]}, seeds=[0, 1], tune={"lr": [1e-6, 3e-2]},
                     tune_seeds=[100])
    out = tmp_path / "sweep"
    results = run_sweep(spec, out, loader=lambda: (make_model("llama"), tok))
    assert results["status"] == "complete"
    rows = {r["label"]: r for r in results["cells"]}
    assert len(rows) == 2                                            # the chain and its LoRA baseline
    for row in rows.values():
        tuning = row["tuning"]
        assert tuning["tuned"] and tuning["chosen"]["values"] == {"lr": 3e-2}
        assert row["lr"] == 3e-2 and row["seeds"] == [0, 1]
        means = [c["mean"] for c in tuning["candidates"]]
        assert len(means) == 2 and all(m is not None for m in means)
    chain = next(r for r in rows.values() if r["links"] == 3)
    assert chain["comparison"]["n"] == 2                             # paired with the tuned LoRA baseline
    # the report seeds never saw a tuning run, and the tuning seed never ran a reported cell
    seeds_of = {}
    for run_dir in (out / "runs").glob("*/seed*"):
        seeds_of.setdefault(run_dir.parent.name, set()).add(int(run_dir.name[4:]))
    reported = {r["key"] for r in results["cells"]}
    tuning_only = {c["key"] for r in results["cells"] for c in r["tuning"]["candidates"]} - reported
    assert all(seeds_of[k] == {100} for k in tuning_only)
    assert all(seeds_of[k] == {0, 1, 100} for k in reported)         # its tuning run, then the report seeds
    text = (out / "results.md").read_text()
    assert "**Tuned per cell:**" in text and "lr=0.03 (edge)" in text and "Tuning (lr" in text
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert "tuned" in csv_header.split(",")
    again = run_sweep(spec, out, resume=True, loader=lambda: (make_model("llama"), tok))   # nothing left to run
    assert again["status"] == "complete" and again["seconds_this_invocation"] < results["seconds_this_invocation"]


def test_an_untuned_sweep_says_so(tmp_path, tok, make_model):
    spec = SweepSpec(settings={**TINY, "plots": False}, grid={"links": [2]}, seeds=[0])
    results = run_sweep(spec, tmp_path / "s", loader=lambda: (make_model("llama"), tok))
    assert "**Not tuned:**" in (tmp_path / "s" / "results.md").read_text()
    assert all(r["tuning"] is None for r in results["cells"])


def test_the_command_line_takes_tune_flags_and_the_dry_run_counts_tuning_runs(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    sweep_cli.add_arguments(parser)
    args = parser.parse_args(["--task", "sst2", "--data-dir", str(FIXTURES), "--links", "1", "3",
                              "--tune", "lr=1e-3,2e-3,5e-3", "--tune-seeds", "7", "8", "--seeds", "0",
                              "--output-dir", str(tmp_path / "x"), "--dry-run", "--steps", "6", "--n-train", "6",
                              "--n-val", "2", "--n-test", "4", "--model", "embedded"])
    spec = sweep_cli.spec_from_args(args)
    assert spec.tune == {"lr": [1e-3, 2e-3, 5e-3]} and spec.tune_seeds == [7, 8]
    assert json.loads(json.dumps(spec.to_dict()))["tune"]["lr"] == [1e-3, 2e-3, 5e-3]
