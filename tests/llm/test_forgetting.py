"""Forgetting that replay cannot fool, and what keeps it small: the KL divergence to the starting model
(0 at the start, positive after a step), replay of text the user wants kept (LM loss or KL to the start),
the replay never sharing a document with the reference, training on phrasings, the learn / forget
trajectory every E steps and a run ended at a chosen step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cola.errors import ConfigError
from cola.llm import divergence
from cola.llm.tasks import blocks as corpus, replay
from cola.llm.tasks.corpus_sources import Document
from cola.llm.experiment import run_experiment
from cola.llm.tasks.facts_sources import Fact, split_phrasings, synthetic_facts
from cola.llm.tasks.references import forgetting_texts, reference_source
from cola.llm.settings import TrainSettings


def loader_of(make_model, tok, family="llama"):
    return lambda: (make_model(family), tok)


@pytest.fixture
def texts(tmp_path) -> tuple[Path, Path]:
    """Two sources of text: paragraphs of one kind of sentence, and of another."""
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(f"It was great. Yes, no, maybe {i}. It was terrible." for i in range(160)))
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Maybe good, maybe bad: {i} {i + 1} {i + 2}." for i in range(160)))
    return one, other


def facts_settings(tmp_path: Path, reference: Path, **changes) -> TrainSettings:
    base = dict(model="tiny", task="facts", train_file="synthetic:12", reference_file=str(reference), n_test=8,
                steps=12, batch_size=4, eval_batch_size=8, method="lora", rank=4, alpha=8.0, lr=5e-2, plots=False,
                save_adapter=False, save_links=False, output_dir=str(tmp_path / "run"), log_every=4,
                targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base.update(changes)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------ the KL to the start

def test_the_kl_to_the_start_is_zero_at_the_start_and_positive_after_a_step(tok, make_model):
    model = make_model("llama")
    ids = torch.randint(3, len(tok), (6, 12), generator=torch.Generator().manual_seed(0))
    start = divergence.start_distributions(model, ids, batch_size=4, k=5)
    assert start.indices.shape == (6, 11, 5) and start.k == 5
    assert divergence.kl_to_start(model, ids, start, batch_size=4) == 0.0      # exactly: the same computation
    scores = corpus.evaluate_corpus(model, ids, 4, start=start)
    assert scores["kl"] == 0.0
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    moved = divergence.kl_to_start(model, ids, start, batch_size=4)
    assert moved > 0
    # the coarsened KL is a lower bound of the full one, and equals it when k covers the vocabulary
    full = divergence.start_distributions(make_model("llama"), ids, 4, k=len(tok))
    exact = divergence.kl_to_start(model, ids, full, 4)
    assert moved <= exact + 1e-6 and exact > 0
    with torch.no_grad():
        p = torch.log_softmax(make_model("llama")(ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    assert exact == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)


def test_start_distributions_refuse_bad_inputs(tok, make_model):
    model = make_model("llama")
    with pytest.raises(ConfigError, match="k=0"):
        divergence.start_distributions(model, torch.ones(2, 4, dtype=torch.long), k=0)
    start = divergence.start_distributions(model, torch.ones(2, 4, dtype=torch.long), k=2)
    with pytest.raises(ConfigError, match="not those of blocks"):
        divergence.kl_to_start(model, torch.ones(3, 4, dtype=torch.long), start)


def test_a_facts_run_reports_the_kl_beside_the_loss_rise(tmp_path, texts, tok, make_model):
    one, other = texts
    results = run_experiment(facts_settings(tmp_path, one, more_references=[str(other)]),
                             loader=loader_of(make_model, tok))
    zero, test = results["zero_shot"]["test"], results["runs"][0]["test"]
    assert zero["reference_kl"] == 0.0 and test["reference_kl"] > 0
    assert test["forgetting"] == pytest.approx(test["reference_loss"] - zero["reference_loss"])
    more = test["more_references"][str(other)]
    assert more["kl"] > 0 and more["forgetting"] == pytest.approx(
        more["loss"] - zero["more_references"][str(other)]["loss"])
    curve = results["runs"][0]["curve"]
    assert curve[0]["validation"]["reference_kl"] == 0.0 and curve[-1]["validation"]["reference_kl"] > 0


# ------------------------------------------------------------------------------ replay

def test_replay_and_reference_never_share_a_document(tmp_path, texts, tok):
    one, other = texts
    settings = facts_settings(tmp_path, one, replay_file=str(one), more_references=[str(other)])
    kept = forgetting_texts(settings, tok, 16, None)    # one source: halved (replay first, reference second)
    replayed = set(kept.replay.blocks.documents)
    assert replayed and replayed.isdisjoint(kept.reference.documents)
    assert replayed.isdisjoint(kept.more[str(other)].documents)
    assert max(replayed) < min(kept.reference.documents)          # by name: the first half, then the second
    # two sources: a replay document whose text is also in the reference is left out
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(one.read_text().split("\n\n")[5] + "\n\n" + other.read_text())
    kept = forgetting_texts(facts_settings(tmp_path, one, replay_file=str(mixed)), tok, 16, None)
    assert "1 replay documents also in the reference left out" in kept.info["replay"]["separation"]
    assert kept.info["replay"]["n_documents"] == 160
    docs = [Document("a", "x"), Document("b", "y")]
    kept_docs, held, _ = replay.separate(docs, docs, True, "t")
    assert [d.name for d in kept_docs] == ["a"] and [d.name for d in held] == ["b"]
    with pytest.raises(ConfigError, match="every replay document is also in the reference"):
        replay.separate(docs, docs, False, "t")


def test_the_default_reference_is_never_the_replayed_source(tmp_path, texts):
    one, _ = texts
    assert reference_source(facts_settings(tmp_path, one, reference_file=None)) == "embedded:tweets"
    replaying = facts_settings(tmp_path, one, reference_file=None, replay_file="embedded:tweets")
    assert reference_source(replaying) == "embedded:python-docs"


def test_replay_draws_are_stateless_and_sized_by_the_ratio():
    assert replay.blocks_per_batch(0.5, 16) == 8 and replay.blocks_per_batch(0.01, 4) == 1
    first = [replay.replay_indices(10, 4, p, seed=3).tolist() for p in range(5)]
    assert first == [replay.replay_indices(10, 4, p, seed=3).tolist() for p in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10))           # an epoch is a permutation of the pool
    assert first != [replay.replay_indices(10, 4, p, seed=4).tolist() for p in range(5)]
    with pytest.raises(ConfigError, match="replay_ratio"):
        replay.blocks_per_batch(0.0, 4)


def test_replay_settings_are_checked(tmp_path, texts):
    one, _ = texts
    with pytest.raises(ConfigError) as err:
        facts_settings(tmp_path, one, replay_file=str(tmp_path / "missing"), replay_ratio=0.0, replay_loss="mse",
                       replay_weight=-1.0)
    text = "\n".join(err.value.problems)
    assert "replay_file=" in text and "no such file or folder" in text
    assert "replay_ratio=0.0" in text and "replay_weight=-1.0" in text and "replay_loss='mse'" in text
    with pytest.raises(ConfigError, match="replay_file is for --task corpus and --task facts"):
        TrainSettings(task="sst2", replay_file=str(one))
    with pytest.raises(ConfigError, match="replay_file=.*no embedded corpus 'nope'"):
        facts_settings(tmp_path, one, replay_file="embedded:nope")


@pytest.fixture
def fluent(texts, tok, make_model):
    """A loader of a tiny Llama first trained on both texts (so that it has something to forget)."""
    model = make_model("llama")
    blocks = [corpus.prepare_reference([Document(str(i), p) for i, p in enumerate(t.read_text().split("\n\n"))],
                                       tok, 16) for t in texts]
    ids = torch.cat([b.input_ids for b in blocks])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        rows = torch.randint(0, ids.shape[0], (16,), generator=torch.Generator().manual_seed(step))
        corpus.lm_loss(model, ids[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def load():
        fresh = make_model("llama")
        fresh.load_state_dict(state)
        return fresh.eval(), tok
    return load


def _forgetting(tmp_path, texts, loader, name, **changes):
    one, _ = texts
    settings = facts_settings(tmp_path, one, output_dir=str(tmp_path / name), lr=0.1, steps=16, **changes)
    test = run_experiment(settings, loader=loader)["runs"][0]["test"]
    return test["forgetting"], test["reference_kl"], test["recall"]


def test_replay_lowers_forgetting_and_replayed_as_kl_keeps_the_model_nearest_the_start(tmp_path, texts, fluent):
    one, _ = texts   # the replay is the reference's own source: its first half, the reference the second
    plain = _forgetting(tmp_path, texts, fluent, "plain")
    lm = _forgetting(tmp_path, texts, fluent, "lm", replay_file=str(one), replay_ratio=1.0)
    kl = _forgetting(tmp_path, texts, fluent, "kl", replay_file=str(one), replay_ratio=1.0, replay_loss="kl")
    assert plain[0] > 0.1                      # the run forgets without replay
    assert lm[0] < plain[0] and kl[0] < plain[0]
    assert kl[1] < lm[1] and kl[1] < plain[1]  # KL to the start: the KL replay moves the model least


# ------------------------------------------------------------------------------ phrasings

def test_training_phrasings_are_chosen_and_the_scored_paraphrases_are_never_trained_on():
    fact = synthetic_facts(4, seed=1).facts[0]
    assert len(fact.phrasings) == 6 and len(fact.paraphrases) == 2
    assert set(fact.phrasings).isdisjoint(fact.paraphrases) and fact.prompt not in fact.phrasings
    trained, held = split_phrasings(fact, 3)
    assert trained == list(fact.phrasings[:3]) and held == list(fact.paraphrases)
    trained, held = split_phrasings(fact, 7)     # past its phrasings: the first paraphrase is trained, not scored
    assert trained[-1] == fact.paraphrases[0] and held == [fact.paraphrases[1]]
    table = Fact("row1", "P", "A", ("p1", "p2", "p3"))   # a table's fact: its first paraphrases are trained
    assert split_phrasings(table, 2) == (["p1", "p2"], ["p3"])
    with pytest.raises(ConfigError, match="train_paraphrases=-1"):
        split_phrasings(table, -1)


def test_a_run_trains_on_phrasings_and_scores_the_held_out_ones(tmp_path, texts, tok, make_model):
    one, _ = texts
    results = run_experiment(facts_settings(tmp_path, one, train_paraphrases=3, steps=4),
                             loader=loader_of(make_model, tok))
    plan = results["plan"]
    split = plan["splits"]["0"]
    assert split["train"] == 12 * 4 and split["paraphrases"] == 12 * 2     # prompt + 3 phrasings; 2 held out
    run = results["runs"][0]
    assert run["test"]["n"] == 12 and run["test"]["paraphrase_n"] == 24
    assert "paraphrase_recall" in run["curve"][-1]["validation"]           # tuning can read it
    with pytest.raises(ConfigError, match="no fact keeps a paraphrase"):
        run_experiment(facts_settings(tmp_path, one, train_paraphrases=8, output_dir=str(tmp_path / "all")),
                       loader=loader_of(make_model, tok))
    with pytest.raises(ConfigError, match="train_paraphrases is for --task facts"):
        TrainSettings(task="corpus", train_paraphrases=2)


# ------------------------------------------------------------------------------ trajectory and checkpoint

def test_the_trajectory_every_e_steps_and_a_run_ended_at_its_chosen_step(tmp_path, texts, tok, make_model):
    one, _ = texts
    whole = run_experiment(facts_settings(tmp_path, one, eval_every=4, method="cola", links=2,
                                          output_dir=str(tmp_path / "whole")), loader=loader_of(make_model, tok))
    run = whole["runs"][0]
    assert [p["step"] for p in run["trajectory"]] == [0, 4, 8, 12]
    assert [p["link"] for p in run["trajectory"]] == [0, 0, 1, 1]
    assert "forgetting" not in run["trajectory"][0]["validation"]                 # the zero-shot point
    assert all("forgetting" in p["validation"] and "reference_kl" in p["validation"] for p in run["trajectory"][1:])
    assert run["trajectory"][-1]["validation"]["recall"] == run["curve"][-1]["validation"]["recall"]
    assert "Trajectory (validation every 4 steps)" in (tmp_path / "whole" / "results.md").read_text()
    ended = run_experiment(facts_settings(tmp_path, one, eval_every=4, method="cola", links=2, end_at_step=8,
                                          output_dir=str(tmp_path / "ended")), loader=loader_of(make_model, tok))
    short = ended["runs"][0]
    assert len(short["train_loss"]) == 8 and short["train_loss"] == run["train_loss"][:8]   # the same schedule
    assert short["lr_per_step"] == run["lr_per_step"][:8] and short["total_steps"] == 12
    assert short["test"]["recall"] == pytest.approx(run["trajectory"][2]["validation"]["recall"])
    assert [c["step"] for c in short["curve"]] == [0, 6, 8]
    with pytest.raises(ConfigError, match="end_at_step=20: after the last step"):
        facts_settings(tmp_path, one, end_at_step=20)
