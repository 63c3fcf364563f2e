"""``cola train --task corpus`` and ``cola sweep`` on it: the LM objective on packed blocks, held-out
perplexity and forgetting after every link, the paired comparison, resume, and the sweep's frontier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cola.llm.tasks import corpus_sources
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings
from cola.llm.sweep import run_sweep
from cola.llm.sweep.spec import SweepSpec

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _text(seed: int, n_words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A folder of 40 text files (the domain) and a reference text file (general text, never trained on)."""
    root = tmp_path_factory.mktemp("corpus")
    domain = root / "domain"
    domain.mkdir()
    for i in range(40):
        (domain / f"doc{i:02d}.txt").write_text(_text(i, 120) + "\n")
    (domain / "skip.md").write_text("not matched by the glob")
    reference = root / "reference.txt"
    reference.write_text("\n\n".join(f"It was great. Yes, no, maybe {i}." for i in range(200)))
    return domain, reference


def corpus_settings(tmp_path: Path, texts, **changes) -> TrainSettings:
    domain, reference = texts
    base = dict(model="tiny", task="corpus", train_file=str(domain), files="*.txt", reference_file=str(reference),
                max_length=16, n_val=4, n_test=6, steps=6, batch_size=2, eval_batch_size=4, links=3, rank=2,
                lr=5e-3, plots=False, save_adapter=False, save_links=False, output_dir=str(tmp_path / "run"),
                log_every=1, targets=["q_proj", "v_proj"])
    base.update(changes)
    return TrainSettings(**base)


def loader_of(make_model, tok, family="llama"):
    return lambda: (make_model(family), tok)


def test_corpus_run_scores_perplexity_and_forgetting_after_every_link(tmp_path, texts, tok, make_model):
    results = run_experiment(corpus_settings(tmp_path, texts, plots=True), loader=loader_of(make_model, tok))
    (run,) = results["runs"]
    zero = results["zero_shot"]["test"]
    assert set(zero) >= {"loss", "perplexity", "bits_per_byte", "reference_loss", "reference_perplexity"}
    assert math.isclose(zero["perplexity"], math.exp(zero["loss"]), rel_tol=1e-9)
    test = run["test"]
    assert test["perplexity"] < zero["perplexity"]                       # it learned the domain
    assert test["forgetting"] == pytest.approx(test["reference_loss"] - zero["reference_loss"])
    assert [c["after_link"] for c in run["curve"]] == [0, 1, 2, 3]       # zero-shot, then after each link
    assert all("perplexity" in c["validation"] and "forgetting" in c["validation"] for c in run["curve"][1:])
    assert len(run["knot_reports"]) == 2 and run["knot_reports"][1]["overlap"]  # diagnostics recorded
    plan = results["plan"]
    split = plan["corpus"]["splits"]["0"]
    held_out = set(split["validation"]["documents"]) | set(split["test"]["documents"])
    assert held_out and all(name.startswith("doc") and name.endswith(".txt") for name in held_out)
    assert plan["corpus"]["corpus"]["n_documents"] == 40                 # skip.md not matched by the glob
    assert plan["tokens_per_example"] == 16.0 and plan["splits"]["0"]["validation"] == 4
    files = results["files"]
    for key in ("perplexity_plot", "loss_plot", "diagnostics_plot", "frontier_plot", "csv", "markdown"):
        assert Path(files[key]).is_file(), key
    table = Path(files["markdown"]).read_text()
    assert "validation ppl after each link" in table and "forgetting" in table
    header = Path(files["csv"]).read_text().splitlines()[0]
    assert "test_perplexity" in header and "test_forgetting" in header


def test_the_test_blocks_do_not_depend_on_the_seed_and_no_document_is_in_two_splits(tmp_path, texts, tok,
                                                                                       make_model):
    settings = corpus_settings(tmp_path, texts, seeds=[0, 1], dry_run=True)
    plan = run_experiment(settings, loader=loader_of(make_model, tok))["plan"]
    splits = plan["corpus"]["splits"]
    assert splits["0"]["test"]["documents"] == splits["1"]["test"]["documents"]
    for s in ("0", "1"):
        assert not set(splits[s]["test"]["documents"]) & set(splits[s]["validation"]["documents"])


def test_compare_gives_the_paired_interval_on_perplexity(tmp_path, texts, tok, make_model):
    settings = corpus_settings(tmp_path, texts, compare=["lora", "cola"], seeds=[0, 1])
    results = run_experiment(settings, loader=loader_of(make_model, tok))
    comparison = results["comparison"]
    gain = comparison["gains"]["cola"]
    assert comparison["metric"] == "perplexity" and not comparison["higher_is_better"]
    assert gain["ci_low"] is not None and gain["verdict"] in ("better", "worse", "within noise")
    expected = [results["runs"][i]["test"]["perplexity"] - results["runs"][i - 1]["test"]["perplexity"]
                for i in (1, 3)]
    assert gain["per_seed"] == pytest.approx(expected)


def test_a_stopped_corpus_run_resumes_to_the_same_numbers(tmp_path, texts, tok, make_model):
    whole = run_experiment(corpus_settings(tmp_path / "a", texts), loader=loader_of(make_model, tok))
    part = corpus_settings(tmp_path / "b", texts, stop_after=3)    # mid-link
    assert run_experiment(part, loader=loader_of(make_model, tok))["status"] == "stopped"
    resumed = run_experiment(part.replace(stop_after=None, resume=True), loader=loader_of(make_model, tok))
    a, b = whole["runs"][0], resumed["runs"][0]
    assert a["train_loss"] == b["train_loss"] and a["position"] == b["position"] == 6
    assert a["test"]["perplexity"] == b["test"]["perplexity"]


def test_the_frank_wolfe_reinit_gets_the_loops_closure(tmp_path, texts, tok, make_model):
    settings = corpus_settings(tmp_path, texts, chain={"reinit": "fw", "reinit_options": {"oversample": 2}})
    results = run_experiment(settings, loader=loader_of(make_model, tok))
    (run,) = results["runs"]
    assert len(run["knot_reports"]) == 2 and run["test"]["perplexity"] < results["zero_shot"]["test"]["perplexity"]


def test_bad_corpus_settings_are_named(tmp_path, texts):
    import cola

    domain, _ = texts
    with pytest.raises(cola.ConfigError) as err:
        TrainSettings(task="corpus", train_file=str(tmp_path / "missing"), template="{x}", reference_file="nope")
    text = "\n".join(err.value.problems)
    assert "no such file or folder" in text and "template is not for --task corpus" in text and "nope" in text
    with pytest.raises(cola.ConfigError, match="reference_file is for --task corpus"):
        TrainSettings(task="tweets", reference_file=str(domain))


def test_sweep_over_a_corpus_compares_perplexity_and_forgetting(tmp_path, texts, tok, make_model):
    domain, reference = texts
    spec = SweepSpec(settings=dict(model="tiny", task="corpus", train_file=str(domain), files="*.txt",
                                   reference_file=str(reference), max_length=16, n_val=4, n_test=6, steps=4,
                                   batch_size=2, eval_batch_size=4, rank=1, lr=5e-3, targets=["q_proj", "v_proj"]),
                     grid={"links": [1, 2]}, cells=[{"method": "lora", "rank": 2}], seeds=[0, 1],
                     metric="perplexity")
    results = run_sweep(spec, tmp_path / "sweep", loader=loader_of(make_model, tok))
    assert results["status"] == "complete"
    rows = {r["label"]: r for r in results["cells"]}
    assert set(rows) == {"links=1", "links=2", "method=lora rank=2"}
    chain = rows["links=2"]
    assert chain["comparison"]["forgetting"]["n"] == 2 and chain["forgetting"]["n"] == 2
    assert chain["diagnostics"] and chain["diagnostics"][0]["effective_rank"] > 0
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "forgetting" in table and "Lower is better for perplexity" in table
    assert (tmp_path / "sweep" / "learn_forget.png").is_file()
    assert (tmp_path / "sweep" / "knot_diagnostics.png").is_file()
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert saved["spec"]["cells"] == [{"method": "lora", "rank": 2}]


def test_packing_the_embedded_corpus_holds_whole_documents_out():
    docs = corpus_sources.embedded_corpus().documents[:30]
    assert all(d.name.endswith(".py") for d in docs)


def test_embedded_corpora_are_named_and_unknown_names_refused():
    import cola

    assert TrainSettings(task="corpus", train_file="embedded:cantonese").train_file == "embedded:cantonese"
    with pytest.raises(cola.ConfigError, match="no embedded corpus 'klingon'; known: embedded:python-stdlib"):
        TrainSettings(task="corpus", train_file="embedded:klingon")
    text = corpus_sources.load_corpus("embedded:cantonese")  # scripts/setup installs its package (pycantonese)
    assert text.info.n_documents > 100_000 and text.info.licence.startswith("CC0")
    assert all(not d.text.isascii() for d in text.documents[1000:1010])  # Cantonese, not English
