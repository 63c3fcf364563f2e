"""``cola train --task facts``: the generator, fact files and their errors, recall computed by hand,
training with recall after every link, the link-by-link retention, the paired comparison, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cola.errors import ConfigError
from cola.llm.tasks import facts_scoring as facts
from cola.llm.experiment import run_experiment
from cola.llm.tasks.facts_sources import (RELATIONS, Fact, check_facts, load_facts, parse_synthetic, read_facts,
                                    synthetic_facts)
from cola.llm.settings import TrainSettings
from cola.llm.tasks import DataError


def loader_of(make_model, tok, family="llama"):
    return lambda: (make_model(family), tok)


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.txt"
    path.write_text("\n\n".join(f"It was great. Yes, no, maybe {i}." for i in range(120)))
    return path


def facts_settings(tmp_path: Path, reference: Path, **changes) -> TrainSettings:
    base = dict(model="tiny", task="facts", train_file="synthetic:12", reference_file=str(reference), n_test=4,
                steps=6, batch_size=4, eval_batch_size=8, links=3, rank=2, lr=2e-2, plots=False, save_adapter=False,
                save_links=False, output_dir=str(tmp_path / "run"), log_every=1, targets=["q_proj", "v_proj"])
    base.update(changes)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------ the generator

def test_the_generator_is_deterministic_and_invents_distinct_facts():
    a, b = synthetic_facts(200, seed=7), synthetic_facts(200, seed=7)
    assert a == b and a.info["seed"] == 7 and a.info["source"] == "synthetic:200:7"
    other = synthetic_facts(200, seed=8)
    assert other.info["fingerprint"] != a.info["fingerprint"]
    assert synthetic_facts(50, seed=7).facts == a.facts[:50]       # a prefix: more facts extend the same list
    prompts = [f.prompt for f in a.facts]
    assert len(set(prompts)) == 200                                 # one answer per prompt
    texts = prompts + [p for f in a.facts for p in f.paraphrases]
    assert len(set(texts)) == len(texts)
    assert all(len(f.paraphrases) == 2 and f.answer and f.answer_prefix == " " for f in a.facts)
    assert {f.prompt.split(" ")[-1] for f in a.facts} >= {"of", "called", "named", "is"}  # every relation used
    numbers = [f.answer for f in a.facts if f.prompt.startswith("The lucky number")]
    assert numbers and all(n.isdigit() and len(n) == 4 for n in numbers)
    assert len(RELATIONS) == 4


def test_synthetic_spec_is_parsed_and_bad_forms_are_refused():
    assert parse_synthetic("synthetic:500") == (500, None)
    assert parse_synthetic("synthetic:3:42") == (3, 42)
    assert load_facts("synthetic:5", default_seed=3).info["seed"] == 3     # the run's test_seed by default
    assert load_facts("synthetic:5:9", default_seed=3).info["seed"] == 9
    for bad in ("synthetic:", "synthetic:0", "synthetic:x", "synthetic:5:a", "synthetic:1000001"):
        with pytest.raises(ConfigError, match="synthetic:N"):
            parse_synthetic(bad)


# ------------------------------------------------------------------------------ fact files

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fact_tables_are_read_in_every_format(tmp_path):
    rows = [{"q": "The capital of Zorbia is", "a": "Quimtrel", "other": ["Zorbia's capital is"]},
            {"q": "Q: Who wrote Flim?\nA: ", "a": "Drel Vak", "other": []}]
    path = _jsonl(tmp_path / "facts.jsonl", rows)
    found = read_facts(path, "q", "a", "other")
    assert [f.prompt for f in found.facts] == [r["q"] for r in rows]
    assert found.facts[0].paraphrases == ("Zorbia's capital is",) and found.facts[0].answer_prefix == " "
    assert found.facts[1].answer_prefix == ""                       # the prompt ends in whitespace
    csv = tmp_path / "facts.csv"
    csv.write_text('prompt,answer,paraphrases\n"X was born in",Plon,"[""Where was X born?""]"\nY likes,7,\n')
    from_csv = read_facts(csv)
    assert [(f.answer, f.paraphrases) for f in from_csv.facts] == [("Plon", ("Where was X born?",)), ("7", ())]
    import pandas

    parquet = tmp_path / "facts.parquet"
    pandas.DataFrame({"prompt": ["A is", "B is"], "answer": ["x", "y"]}).to_parquet(parquet)
    assert [f.answer for f in read_facts(parquet).facts] == ["x", "y"]


def test_malformed_fact_files_are_refused_with_every_problem_named(tmp_path):
    rows = [{"prompt": "A is", "answer": "x"},
            {"prompt": "A is", "answer": "y"},                       # one prompt, two answers
            {"prompt": "B is", "answer": "  "},                      # empty answer
            {"prompt": "", "answer": "z"},                           # empty prompt
            {"prompt": "C is", "answer": "w", "paraphrases": "not a list"},
            {"prompt": "D is", "answer": "v", "paraphrases": ["A is"]}]  # a paraphrase that is A's prompt
    with pytest.raises(DataError) as err:
        read_facts(_jsonl(tmp_path / "bad.jsonl", rows))
    text = str(err.value)
    assert "5 malformed" in text and "two answers" in text and "row 3" in text and "row 4" in text
    assert "'paraphrases'" in text and "'A is'" in text
    with pytest.raises(DataError, match=r"no column 'answer' \(columns present: prompt, text\)"):
        read_facts(_jsonl(tmp_path / "cols.jsonl", [{"prompt": "A", "text": "b"}]))
    with pytest.raises(DataError, match="no facts"):
        check_facts([], "empty.jsonl")
    repeated = check_facts([{"prompt": "A is", "answer": "x"}] * 3, "repeats")
    assert len(repeated) == 1                                       # exact repeats dropped (with a warning)


def test_a_malformed_file_stops_cola_train_before_anything_is_written(tmp_path, reference, tok, make_model):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "A is", "answer": "x"}, {"prompt": "A is", "answer": "y"}])
    settings = facts_settings(tmp_path, reference, train_file=str(bad))
    with pytest.raises(DataError, match="two answers"):
        run_experiment(settings, loader=loader_of(make_model, tok))
    assert not (tmp_path / "run").exists()


def test_facts_settings_are_checked():
    with pytest.raises(ConfigError) as err:
        TrainSettings(task="facts", template="{x}", test_file="nope.jsonl")
    text = str(err.value)
    assert "needs --train-file" in text and "template is not for --task facts" in text
    with pytest.raises(ConfigError, match="synthetic:N"):
        TrainSettings(task="facts", train_file="synthetic:many")
    with pytest.raises(ConfigError, match="no such file"):
        TrainSettings(task="facts", train_file="missing.jsonl")
    assert TrainSettings(task="facts", train_file="synthetic:10").resolved().objective == "lm"


# ------------------------------------------------------------------------------ scoring by hand

def _greedy(model, context: list[int], n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(context):]


def test_recall_token_accuracy_and_answer_loss_match_a_hand_computation(tok, make_model):
    model = make_model("llama", seed=3)
    taught = synthetic_facts(6, seed=1).facts
    # answers the tiny model gives greedily, so that some facts are recalled and some are not
    encoded = facts.encode_facts(tok, taught)
    for i in (0, 2, 4):
        ex = encoded[i]
        greedy = _greedy(model, list(ex.context), len(ex.candidates[0]))
        encoded[i] = type(ex)(ex.context, (tuple(greedy),), 0)
    scores = facts.score_answers(model, encoded, batch_size=4, pad_token_id=0)
    hits, correct, tokens, nll = [], 0, 0, 0.0
    for ex in encoded:
        answer = list(ex.candidates[0])
        greedy = _greedy(model, list(ex.context), len(answer))
        hits.append(greedy == answer)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([list(ex.context) + answer])).logits[0].double(), -1)
        start = len(ex.context) - 1
        for j, token in enumerate(answer):
            row = logp[start + j]
            correct += int(row.argmax()) == token
            nll -= float(row[token])
            tokens += 1
    metrics = facts.answer_metrics(scores)
    assert hits[0] and hits[2] and hits[4] and not all(hits)
    assert metrics["recall"] == pytest.approx(sum(hits) / len(hits))
    assert facts.recalled_text(scores) == "".join("1" if h else "0" for h in hits)
    assert metrics["token_accuracy"] == pytest.approx(correct / tokens)
    assert metrics["answer_loss"] == pytest.approx(nll / tokens, rel=1e-5)


def test_retention_counts_kept_lost_and_new_facts():
    assert facts.retention("1100", "1010") == {"kept": 1, "lost": 1, "new": 1, "kept_fraction": 0.5}
    assert facts.retention("0000", "0110")["kept_fraction"] is None
    with pytest.raises(ConfigError):
        facts.retention("10", "1")


# ------------------------------------------------------------------------------ training

def test_facts_run_learns_and_scores_recall_after_every_link(tmp_path, reference, tok, make_model):
    results = run_experiment(facts_settings(tmp_path, reference, steps=24, plots=True),
                             loader=loader_of(make_model, tok))
    (run,) = results["runs"]
    zero, test = results["zero_shot"]["test"], run["test"]
    assert set(test) >= {"recall", "token_accuracy", "answer_loss", "recalled", "paraphrase_recall",
                         "paraphrase_n", "reference_loss", "forgetting"}
    assert test["n"] == 12 and test["paraphrase_n"] == 24 and len(test["recalled"]) == 12
    assert test["answer_loss"] < zero["answer_loss"] - 0.5            # it learned the answers
    assert test["token_accuracy"] > zero["token_accuracy"]
    assert test["forgetting"] == pytest.approx(test["reference_loss"] - zero["reference_loss"])
    assert [c["after_link"] for c in run["curve"]] == [0, 1, 2, 3]
    link2 = run["curve"][2]["validation"]
    before = run["curve"][1]["validation"]["recalled"]
    assert link2["kept"] + link2["lost"] == before.count("1")
    assert link2["new"] == sum(1 for a, b in zip(before, link2["recalled"]) if a == "0" and b == "1")
    plan = results["plan"]
    assert plan["facts"]["facts"]["source"] == "synthetic:12:0" and plan["splits"]["0"]["paraphrases"] == 24
    text = (tmp_path / "run" / "results.md").read_text()
    assert "exact-match recall of 12 facts" in text and "Link by link" in text
    assert (tmp_path / "run" / "recall_per_link.png").is_file() and (tmp_path / "run" / "learn_forget.png").is_file()
    row = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert "test_recall" in row[0]


def test_compare_gives_a_paired_verdict_on_recall(tmp_path, reference, tok, make_model):
    settings = facts_settings(tmp_path, reference, compare=["lora", "cola"], seeds=[0, 1], n_val=6)
    results = run_experiment(settings, loader=loader_of(make_model, tok))
    comparison = results["comparison"]
    assert comparison["metric"] == "recall" and comparison["higher_is_better"]
    assert comparison["gains"]["cola"]["n"] == 2 and comparison["gains"]["cola"]["verdict"] in (
        "better", "worse", "within noise")
    assert results["plan"]["splits"]["0"]["validation"] == 6
    assert all(len(c["validation"]["recalled"]) == 6 for r in results["runs"] for c in r["curve"])


def test_a_run_resumed_across_a_knot_is_identical(tmp_path, reference, tok, make_model):
    whole = run_experiment(facts_settings(tmp_path, reference, output_dir=str(tmp_path / "whole")),
                           loader=loader_of(make_model, tok))
    out = str(tmp_path / "cut")
    first = run_experiment(facts_settings(tmp_path, reference, output_dir=out, stop_after=2),  # the knot at step 2
                           loader=loader_of(make_model, tok))
    assert first["status"] == "stopped"
    second = run_experiment(facts_settings(tmp_path, reference, output_dir=out, stop_after=1, resume=True),
                            loader=loader_of(make_model, tok))
    assert second["status"] == "stopped"
    done = run_experiment(facts_settings(tmp_path, reference, output_dir=out, resume=True),
                          loader=loader_of(make_model, tok))
    a, b = whole["runs"][0], done["runs"][0]
    assert a["knots"] == [2, 4]
    assert a["train_loss"] == b["train_loss"]
    assert a["test"]["recalled"] == b["test"]["recalled"]
    assert math.isclose(a["test"]["answer_loss"], b["test"]["answer_loss"], rel_tol=0, abs_tol=1e-12)
    assert [c["validation"]["recalled"] for c in a["curve"]] == [c["validation"]["recalled"] for c in b["curve"]]


def test_a_fact_file_trains_with_its_own_column_names(tmp_path, reference, tok, make_model):
    rows = [{"q": f"Person {i} was born in", "a": f"Town{i}", "alt": [f"Where was person {i} born?"]}
            for i in range(5)]
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    settings = facts_settings(tmp_path, reference, train_file=str(path), prompt_field="q", answer_field="a",
                              paraphrases_field="alt", method="lora", steps=3)
    results = run_experiment(settings, loader=loader_of(make_model, tok))
    assert results["runs"][0]["test"]["n"] == 5 and results["runs"][0]["test"]["paraphrase_n"] == 5
    assert results["plan"]["facts"]["facts"]["fields"] == {"prompt": "q", "answer": "a", "paraphrases": "alt"}


def test_fact_dataclass_prefix_is_part_of_the_taught_text(tok):
    (ex,) = facts.encode_facts(tok, [Fact("f", "A is", "Yes", (), " ")])
    assert tok.decode(list(ex.candidates[0])) == " Yes"


def test_the_restart_recipe_of_relora_is_expressible_as_settings(tmp_path, reference, tok, make_model):
    """Optimizer state 99%-pruned at each knot, the LR dropped and re-warmed over a jagged cosine schedule,
    links starting in the gradient's top subspace (fw, both factors): all plain settings."""
    chain = {"optimizer_policy": "prune", "optimizer_policy_options": {"fraction": 0.99}, "lr_policy": "rewarm",
             "lr_policy_options": {"steps": 3}, "lr_schedule": "cosine", "warmup_steps": 2, "reinit": "fw",
             "reinit_options": {"init": "both"}}
    results = run_experiment(facts_settings(tmp_path, reference, steps=12, links=2, chain=chain),
                             loader=loader_of(make_model, tok))
    (run,) = results["runs"]
    assert run["knots"] == [6] and run["chain_config"]["optimizer_policy_options"] == {"fraction": 0.99}
    lr = run["lr_per_step"]
    assert lr[1] > lr[0]                                              # the warm-up
    assert lr[6] < lr[5] / 2                                          # dropped at the knot ...
    assert lr[6] < lr[7] < lr[8] and lr[9] < lr[8]                    # ... re-warmed over 3 steps, then the cosine
    assert run["knot_reports"][0]["step"] == 6


def test_the_encodings_a_process_keeps_are_those_of_the_facts_taught(tokenizer, tmp_path):
    """Two runs of one process teaching different subsets of one fact source (n_train) each get their own
    facts' encodings (the in-process cache is keyed by the facts taught, not by their source)."""
    from cola.llm.settings import TrainSettings
    from cola.llm.tasks.facts import load_facts_data

    (tmp_path / "reference.txt").write_text("\n\n".join(f"It was great. Yes {i}." for i in range(40)))
    sizes = []
    for n in (8, 16, 8):
        settings = TrainSettings(task="facts", train_file="synthetic:32", n_train=n, n_test=4,
                                 reference_file=str(tmp_path / "reference.txt")).resolved()
        task, data, _ = load_facts_data(settings, tokenizer, [0], 64)
        sizes.append((len(data[0].train), len(data[0].test.facts), task.info["facts"]["n_facts"]))
    assert sizes == [(8, 8, 8), (16, 16, 16), (8, 8, 8)]
