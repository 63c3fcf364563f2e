"""Encoding, losses and scoring: gathered-position results equal full-logit results."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from cola.errors import ConfigError
from cola.llm.objective import (
    CandidateScores,
    candidate_scores,
    default_max_length,
    encode_examples,
    evaluate,
    iterate_batches,
    predictions,
    score_examples,
    training_loss,
)
from cola.llm.tasks import get_task, make_task

ATOL = 1e-5


@pytest.fixture(scope="module")
def rte_batch(tokenizer, rows):
    task = get_task("rte")
    return task, encode_examples(tokenizer, rows("rte")[:5], task)


@pytest.fixture(scope="module")
def multi_token_batch(tokenizer, rows):
    """RTE examples with answers that split into several tokens of different lengths."""
    task = make_task("{premise}\nDoes this mean that \"{hypothesis}\" is true?\n", ["zyq", "Maybe wxvj"],
                     label_names=["entailment", "not_entailment"])
    return task, encode_examples(tokenizer, rows("rte")[:5], task)


def _full_logit_scores(model, batch):
    """Reference: each (context + candidate) alone through the model's own forward, full logits."""
    sums = torch.zeros(len(batch), len(batch[0].candidates))
    counts = torch.zeros_like(sums)
    for b, ex in enumerate(batch):
        for c, cand in enumerate(ex.candidates):
            ids = torch.tensor([list(ex.context) + list(cand)])
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(ex.context) - 1
            sums[b, c] = sum(logp[start + k, tok] for k, tok in enumerate(cand))
            counts[b, c] = len(cand)
    return sums, counts


def test_encoding_adds_bos_and_single_token_answers(tokenizer, rte_batch):
    task, batch = rte_batch
    bos = tokenizer.bos_token_id
    assert all(ex.context[0] == bos and bos not in ex.context[1:] for ex in batch)
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No"))
    assert all(ex.candidates == (tuple(yes), tuple(no)) for ex in batch)
    assert [ex.label for ex in batch] == [0, 1, 0, 1, 0]
    text = tokenizer.decode(batch[0].context[1:] + batch[0].candidates[0])
    assert text == task.text({"premise": "The cat sat on the mat all afternoon.",
                              "hypothesis": "A cat was on the mat."}, 0)


def test_candidate_tokens_follow_the_joint_tokenisation(tokenizer, rows):
    task = get_task("sst2")
    ex = encode_examples(tokenizer, rows("sst2")[:1], task)[0]
    full = tokenizer(task.text(rows("sst2")[0], 1), add_special_tokens=True)["input_ids"]
    assert list(ex.context) + list(ex.candidates[1]) == full


def test_truncation_cuts_the_passage_from_the_left(tokenizer, rows, caplog):
    task = get_task("boolq")
    examples = rows("boolq")[:3]
    full = encode_examples(tokenizer, examples, task)
    limit = min(len(e.context) for e in full) - 5
    with caplog.at_level(logging.WARNING):
        cut = encode_examples(tokenizer, examples, task, max_length=limit)
    for whole, short in zip(full, cut):
        assert len(short.context) + 1 <= limit
        assert short.context[0] == tokenizer.bos_token_id  # BOS kept
        assert short.context[1:] == whole.context[-(len(short.context) - 1):]  # the end is kept
        assert short.candidates == whole.candidates
        assert short.truncated == len(whole.context) - len(short.context)
    assert "3 of 3 prompts cut from the left" in caplog.text


def test_max_length_too_small(tokenizer, rows):
    with pytest.raises(ConfigError, match="max_length=2 is too small"):
        encode_examples(tokenizer, rows("rte")[:1], get_task("rte"), max_length=2)


@pytest.mark.parametrize("fast_path", [True, False])
def test_candidate_scores_equal_full_logits(tiny_model, rte_batch, fast_path):
    _, batch = rte_batch
    with torch.no_grad():
        got = candidate_scores(tiny_model, batch, pad_token_id=0, fast_path=fast_path)
        want_sums, want_counts = _full_logit_scores(tiny_model, batch)
    torch.testing.assert_close(got.logprob_sum, want_sums, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.n_tokens, want_counts)


def test_multi_token_candidates_equal_full_logits(tiny_model, multi_token_batch):
    _, batch = multi_token_batch
    lengths = {len(c) for ex in batch for c in ex.candidates}
    assert len(lengths) > 1 and min(lengths) > 1
    with torch.no_grad():
        got = candidate_scores(tiny_model, batch)
        want_sums, want_counts = _full_logit_scores(tiny_model, batch)
    torch.testing.assert_close(got.logprob_sum, want_sums, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logprob_mean, want_sums / want_counts, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("which", ["rte", "multi"])
def test_classification_loss_and_gradient_equal_full_logits(make_model, rte_batch, multi_token_batch, family,
                                                            which):
    _, batch = rte_batch if which == "rte" else multi_token_batch
    labels = torch.tensor([ex.label for ex in batch])
    model = make_model(family)
    loss = training_loss(model, batch, "classification")
    loss.backward()
    grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    sums, counts = _full_logit_scores(model, batch)
    reference = F.cross_entropy(sums / counts, labels)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, model.get_output_embeddings().weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["rte", "multi"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_lm_loss_equals_transformers_loss(tiny_model, rte_batch, multi_token_batch, which, fast_path):
    """The LM loss on gold answers equals transformers' loss with every other label -100."""
    _, batch = rte_batch if which == "rte" else multi_token_batch
    seqs = [list(ex.context) + list(ex.candidates[ex.label]) for ex in batch]
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, ex) in enumerate(zip(seqs, batch)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(ex.context):len(seq)] = torch.tensor(ex.candidates[ex.label])
    with torch.no_grad():
        reference = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = training_loss(tiny_model, batch, "lm", fast_path=fast_path)
    torch.testing.assert_close(loss, reference, atol=ATOL, rtol=0)


def test_padding_does_not_change_scores(tiny_model, rte_batch):
    _, batch = rte_batch
    with torch.no_grad():
        together = candidate_scores(tiny_model, batch, fast_path=False).logprob_sum
        alone = torch.cat([candidate_scores(tiny_model, [ex], fast_path=False).logprob_sum for ex in batch])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


def test_lm_head_only_runs_on_needed_rows(tiny_model, rte_batch, multi_token_batch):
    seen = []
    handle = tiny_model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.no_grad():
            candidate_scores(tiny_model, rte_batch[1])
            candidate_scores(tiny_model, multi_token_batch[1])
    finally:
        handle.remove()
    assert seen[0][0] == len(rte_batch[1])  # one row per example on the fast path
    n_tokens = sum(len(c) for ex in multi_token_batch[1] for c in ex.candidates)
    assert seen[1][0] == n_tokens and len(seen[1]) == 2  # [tokens, hidden]: no sequence dimension


def test_bad_loss_name(tiny_model, rte_batch):
    with pytest.raises(ConfigError, match="loss='mse' is not one of classification, lm"):
        training_loss(tiny_model, rte_batch[1], "mse")


def test_predictions_hand_computed():
    scores = CandidateScores(torch.tensor([[-2.0, -3.0], [-4.0, -3.5], [-6.0, -8.0]]),
                             torch.tensor([[2.0, 1.0], [4.0, 1.0], [3.0, 2.0]]))
    # mean: [-1, -3], [-1, -3.5], [-2, -4]; sum as is; norm by characters (2, 4): [-1, -.75], [-2, -.875], [-3, -2]
    assert predictions(scores, [2, 4], "mean") == [0, 0, 0]
    assert predictions(scores, [2, 4], "sum") == [0, 1, 0]
    assert predictions(scores, [2, 4], "norm") == [1, 1, 1]
    with pytest.raises(ConfigError, match="rule='max'"):
        predictions(scores, [2, 4], "max")


def test_evaluate_matches_scores(tiny_model, tokenizer, rows):
    task = get_task("cb")
    examples = rows("cb") + rows("cb", "validation")
    tiny_model.train()
    result = evaluate(tiny_model, tokenizer, task, examples, batch_size=3)
    assert tiny_model.training  # mode restored
    tiny_model.eval()
    encoded = encode_examples(tokenizer, examples, task)
    scores = score_examples(tiny_model, encoded, batch_size=5)
    labels = [e.label for e in encoded]
    preds = scores.logprob_mean.argmax(1).tolist()
    assert result["n"] == len(examples) and result["rule"] == "mean"
    assert result["accuracy"] == result["acc_mean"] == sum(p == t for p, t in zip(preds, labels)) / len(labels)
    assert set(result) == {"n", "rule", "accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm", "loss"}
    assert result["loss"] == pytest.approx(F.cross_entropy(scores.logprob_mean, torch.tensor(labels)).item(), abs=1e-5)
    assert "macro_f1" not in evaluate(tiny_model, tokenizer, get_task("rte"), rows("rte"))


def test_evaluate_rules_and_progress(tiny_model, tokenizer, rows):
    task = get_task("rte")
    by_rule = {r: evaluate(tiny_model, tokenizer, task, rows("rte"), rule=r, progress=True) for r in ("mean", "norm")}
    assert by_rule["norm"]["accuracy"] == by_rule["norm"]["acc_norm"]
    with pytest.raises(ConfigError, match="rule="):
        evaluate(tiny_model, tokenizer, task, rows("rte"), rule="best")
    with pytest.raises(ConfigError, match="no examples"):
        evaluate(tiny_model, tokenizer, task, [])


def test_default_max_length(tiny_model, tokenizer):
    assert default_max_length(tiny_model, tokenizer) == 256


def test_iterate_batches(rte_batch):
    _, batch = rte_batch
    plain = iterate_batches(batch, 2)
    assert [len(b) for b in plain] == [2, 2, 1] and plain[0] == batch[:2]
    shuffled = iterate_batches(batch, 2, torch.Generator().manual_seed(1))
    again = iterate_batches(batch, 2, torch.Generator().manual_seed(1))
    assert shuffled == again and sorted(map(id, sum(shuffled, []))) == sorted(map(id, batch))
    with pytest.raises(ConfigError, match="batch_size=0"):
        iterate_batches(batch, 0)
