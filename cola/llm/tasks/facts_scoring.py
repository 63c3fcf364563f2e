"""The facts task: teaching a model facts (knowledge injection), and measuring what it recalls.

Training: the LM loss on the answer tokens of every fact (the prompt is context only), the facts
read in a seeded order each epoch like the examples of the classification tasks. Facts come from
:mod:`cola.llm.tasks.facts_sources` (a table, or ``synthetic:N`` invented facts whose number sets the
capacity a run needs).

Scoring (:func:`score_answers`, :func:`answer_metrics`), for every fact, teacher-forced over the
answer's tokens after the prompt:

* ``recall``: the fraction of facts whose every answer token is the argmax of the model's
  distribution at its position. That is exact-match recall of greedy decoding: greedy decoding
  produces the answer exactly when each answer token is the argmax given the ones before it;
* ``token_accuracy``: the fraction of answer tokens that are the argmax;
* ``answer_loss``: the mean negative log-likelihood of an answer token (nats);
* the same three on the paraphrased prompts (``paraphrase_recall``, ...), which are never trained on;
* ``recalled``: which facts were recalled, one character each (``"1"``/``"0"``) in the facts'
  order, from which :func:`retention` counts, after each link, the facts kept from the link before,
  the facts lost and the new ones.

Forgetting is measured as in the corpus task: the rise of the loss on a reference text the run never
trains on (default: the embedded tweets) over the zero-shot model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cola.errors import ConfigError
from cola.llm.tasks.facts_sources import Fact, answer_prefix
from cola.llm.objective import EncodedExample, continuation, fit_context, hidden_states, log_probs, special_affixes

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# ============================================================================ encoding

def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
                   prefixes: Sequence[str], max_length: int | None = None) -> list[EncodedExample]:
    """Each (prompt, answer) as an :class:`EncodedExample` with one candidate, the answer's tokens.

    The answer's tokens are those that ``prompt + prefix + answer`` has beyond the prompt's own (the
    answer tokenised alone where the two disagree at the boundary), as the classification tasks do;
    a prompt too long for ``max_length`` is cut from the left.
    """
    if not prompts:
        return []
    leading = special_affixes(tokenizer)
    prompt_ids = _token_ids(tokenizer, list(prompts))
    full_ids = _token_ids(tokenizer, [p + x + a for p, x, a in zip(prompts, prefixes, answers)])
    alone = _token_ids(tokenizer, [x + a for x, a in zip(prefixes, answers)])
    encoded = []
    for prompt, ids, whole, single in zip(prompts, prompt_ids, full_ids, alone):
        answer = continuation(ids, whole)
        answer = tuple(answer if answer is not None else single)
        if not answer:
            raise ConfigError(f"the answer of prompt {prompt[:60]!r} tokenises to nothing")
        context, dropped = fit_context(leading, list(ids), len(answer), max_length)
        encoded.append(EncodedExample(tuple(context), (answer,), 0, dropped))
    return encoded


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's ids without special tokens; from a fast tokenizer's Rust tokenizer directly when it encodes as
    the tokenizer's call does (no truncation or padding of its own), which spares a Python object per text."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation or backend.padding:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def encode_facts(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
                 max_length: int | None = None) -> list[EncodedExample]:
    """The facts' prompts and answers (:func:`encode_prompts`), in order: what the run trains on."""
    return encode_prompts(tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                          [f.answer_prefix for f in facts], max_length)


def encode_paraphrases(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
                       max_length: int | None = None) -> list[EncodedExample]:
    """Every paraphrased prompt of ``facts`` with its fact's answer, fact by fact."""
    return encode_phrasings(tokenizer, facts, [f.paraphrases for f in facts], max_length)


def encode_phrasings(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], prompts: Sequence[Sequence[str]],
                     max_length: int | None = None) -> list[EncodedExample]:
    """``prompts[i]`` (other phrasings of fact ``i``) with fact ``i``'s answer, fact by fact."""
    pairs = [(p, f) for f, ps in zip(facts, prompts) for p in ps]
    return encode_prompts(tokenizer, [p for p, _ in pairs], [f.answer for _, f in pairs],
                          [answer_prefix(p) for p, _ in pairs], max_length)


# ============================================================================ scoring

@dataclass(frozen=True)
class AnswerScores:
    """Per encoded example: answer tokens, how many of them were the argmax, and their summed NLL."""

    n_tokens: torch.Tensor   # [n] int64
    n_correct: torch.Tensor  # [n] int64
    nll: torch.Tensor        # [n] float64

    @property
    def exact(self) -> torch.Tensor:
        """``[n]`` bool: every answer token was the argmax (greedy decoding gives the answer)."""
        return self.n_correct == self.n_tokens


def _batch_scores(model: PreTrainedModel, batch: Sequence[EncodedExample], pad_token_id: int):
    sequences = [ex.context + ex.candidates[0] for ex in batch]
    hidden = hidden_states(model, sequences, pad_token_id)
    rows, positions, targets = [], [], []
    for n, ex in enumerate(batch):
        start = len(ex.context) - 1  # the hidden state at position p predicts token p + 1
        answer = ex.candidates[0]
        rows += [n] * len(answer)
        positions += range(start, start + len(answer))
        targets += answer
    device = hidden.device
    row_index = torch.tensor(rows, device=device)
    logp = log_probs(model, hidden[row_index, torch.tensor(positions, device=device)])
    target = torch.tensor(targets, device=device)
    token_nll = -logp.gather(1, target[:, None])[:, 0].double()
    hit = (logp.argmax(dim=1) == target).long()
    n = len(batch)
    return (torch.zeros(n, dtype=torch.float64, device=device).index_add(0, row_index, token_nll).cpu(),
            torch.zeros(n, dtype=torch.long, device=device).index_add(0, row_index, hit).cpu())


@torch.no_grad()
def score_answers(model: PreTrainedModel, encoded: Sequence[EncodedExample], batch_size: int = 16,
                  pad_token_id: int = 0) -> AnswerScores:
    """Teacher-forced scores of every example's answer (eval mode, no gradients; the mode is restored).

    Examples are batched by similar length; the results are in input order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    n = len(encoded)
    nll = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.long)
    tokens = torch.tensor([len(ex.candidates[0]) for ex in encoded], dtype=torch.long)
    order = sorted(range(n), key=lambda i: len(encoded[i].context) + len(encoded[i].candidates[0]), reverse=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            batch_nll, batch_correct = _batch_scores(model, [encoded[i] for i in index], pad_token_id)
            nll[index], correct[index] = batch_nll, batch_correct
    finally:
        model.train(was_training)
    return AnswerScores(tokens, correct, nll)


def answer_metrics(scores: AnswerScores, prefix: str = "") -> dict[str, Any]:
    """``recall``, ``token_accuracy``, ``answer_loss`` and ``n`` (names with ``prefix``) of ``scores``."""
    n = int(scores.n_tokens.numel())
    if n == 0:
        return {}
    tokens = int(scores.n_tokens.sum())
    return {f"{prefix}recall": float(scores.exact.double().mean()),
            f"{prefix}token_accuracy": float(scores.n_correct.sum()) / tokens,
            f"{prefix}answer_loss": float(scores.nll.sum()) / tokens,
            f"{prefix}n": n}


def recalled_text(scores: AnswerScores) -> str:
    """Which facts were recalled: ``"1"`` or ``"0"`` per fact, in order."""
    return "".join("1" if hit else "0" for hit in scores.exact.tolist())


def retention(before: str, after: str) -> dict[str, Any]:
    """What a link did to the facts recalled before it (``before``/``after``: :func:`recalled_text`).

    Returns ``kept`` (recalled before and after), ``lost`` (recalled before, not after), ``new``
    (recalled after only), and ``kept_fraction`` (kept / recalled before; None when none was).
    """
    if len(before) != len(after):
        raise ConfigError(f"retention: {len(before)} facts before and {len(after)} after")
    kept = sum(1 for a, b in zip(before, after) if a == b == "1")
    lost = sum(1 for a, b in zip(before, after) if a == "1" and b == "0")
    new = sum(1 for a, b in zip(before, after) if a == "0" and b == "1")
    return {"kept": kept, "lost": lost, "new": new,
            "kept_fraction": kept / (kept + lost) if kept + lost else None}
