"""Tokenising prompts and answers, training losses, and candidate scoring for evaluation.

Every example becomes a *context* (the prompt's tokens, with the tokenizer's leading special
tokens such as BOS) and one token sequence per candidate answer. The LM head runs only where
a loss or score needs it: the base transformer gives the last hidden states, those at the
positions that predict answer tokens are gathered, and only those rows go through the output
embedding (never the full vocabulary over the whole sequence).

Two paths, same numbers:

* single-token answers (most answer words: " great", "Yes"): one forward of the context per
  example scores every candidate from the hidden state at the last prompt position;
* otherwise one sequence per (example, candidate): ``C`` forwards of the prompt for ``C``
  candidates (``lm`` loss: only the gold candidate, one forward).

Batches are padded on the right to the longest sequence in the batch (dynamic padding), so
real tokens keep positions ``0..n-1`` in every model family.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cola.errors import ConfigError
from cola.llm.metrics import accuracy, macro_f1
from cola.llm.tasks.templates import Example, Task

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LOSSES = ("classification", "lm")
"""``classification``: cross-entropy over the candidates' mean token log-likelihoods (the
paper's setting); ``lm``: token-level negative log-likelihood of the gold answer."""

RULES = ("mean", "sum", "norm")
"""Scoring rules: ``mean`` token log-probability (MeZO, the paper), ``sum`` (lm-eval ``acc``),
``norm`` (lm-eval ``acc_norm``: sum divided by the candidate's length in characters)."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example: its context, each candidate continuation, its label.

    ``truncated`` counts the prompt tokens dropped from the left to fit ``max_length``.
    """

    context: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    label: int
    truncated: int = 0


@dataclass(frozen=True)
class CandidateScores:
    """Per example and candidate: summed log-probability of the candidate's tokens and their count."""

    logprob_sum: torch.Tensor  # [batch, candidates], float32
    n_tokens: torch.Tensor  # [batch, candidates], float32

    @property
    def logprob_mean(self) -> torch.Tensor:
        """Mean token log-probability (the MeZO scoring rule)."""
        return self.logprob_sum / self.n_tokens


# ------------------------------------------------------------------------------------ encoding

def special_affixes(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before the text (e.g. OPT's ``</s>``, Llama's ``<s>``)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def continuation(prompt_ids: list[int], full_ids: list[int]) -> list[int] | None:
    """Tokens of ``full`` after ``prompt``, when tokenising the whole text keeps the prompt's tokens."""
    if len(full_ids) > len(prompt_ids) and full_ids[:len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    return None


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], task: Task,
                    max_length: int | None = None) -> list[EncodedExample]:
    """Tokenise each example's prompt and candidates for :func:`training_loss` and :func:`evaluate`.

    A candidate's tokens are those that ``prompt + candidate`` has beyond the prompt's own
    tokens (as lm-evaluation-harness does), falling back to tokenising the candidate alone
    when the two tokenisations disagree at the boundary. With ``max_length``, prompts are cut
    from the left (the start of the passage goes, the question and answer stay); a warning
    gives the count.

    Raises:
        ConfigError: ``max_length`` leaves no room for the prompt's last token and the answer.
    """
    leading = special_affixes(tokenizer)
    prompts = [task.prompt(ex) for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    candidate_ids = []
    fallback = 0
    alone = tokenizer(list(task.candidates), add_special_tokens=False)["input_ids"]
    for c, candidate in enumerate(task.candidates):
        full = tokenizer([p + candidate for p in prompts], add_special_tokens=False)["input_ids"] if prompts else []
        column = []
        for ids, whole in zip(prompt_ids, full):
            cont = continuation(ids, whole)
            fallback += cont is None
            column.append(tuple(cont if cont is not None else alone[c]))
        candidate_ids.append(column)
    if fallback:
        logger.debug("%s: %d candidate tokenisations merged across the prompt boundary; tokenised "
                     "the candidate alone instead", task.name, fallback)
    encoded = []
    for i, ex in enumerate(examples):
        candidates = tuple(column[i] for column in candidate_ids)
        if any(not cand for cand in candidates):
            raise ConfigError(f"{task.name}: a candidate of {list(task.candidates)} tokenises to nothing")
        context, dropped = fit_context(leading, list(prompt_ids[i]), max(map(len, candidates)), max_length)
        encoded.append(EncodedExample(tuple(context), candidates, task.label(ex), dropped))
    truncated = [e.truncated for e in encoded if e.truncated]
    if truncated:
        logger.warning("%s: %d of %d prompts cut from the left to fit max_length=%s (up to %d tokens dropped)",
                       task.name, len(truncated), len(encoded), max_length, max(truncated))
    return encoded


def fit_context(leading: list[int], body: list[int], answer_len: int, max_length: int | None) -> tuple[list[int], int]:
    """``leading + body`` cut from the left of ``body`` so that answer tokens fit ``max_length``."""
    if max_length is None or len(leading) + len(body) + answer_len <= max_length:
        return leading + body, 0
    room = max_length - len(leading) - answer_len
    if room < 1:
        raise ConfigError(f"max_length={max_length} is too small: the answer needs {answer_len} tokens and "
                          f"the prompt at least {len(leading) + 1}")
    return leading + body[-room:], len(body) - room


def default_max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The model's context length (``max_position_embeddings``), capped by the tokenizer's."""
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(usable) if usable else None


# ------------------------------------------------------------------------------------ forward

def _input_device(model: PreTrainedModel) -> torch.device:
    """Where the token ids go: the input embedding's device (also right for split models)."""
    return model.get_input_embeddings().weight.device


def hidden_states(model: PreTrainedModel, sequences: Sequence[Sequence[int]],
                   pad_token_id: int) -> torch.Tensor:
    """Last hidden states ``[n, longest, hidden]`` of right-padded ``sequences`` (no LM head)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    device = _input_device(model)
    out = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out[0]


def log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary of the LM head applied to ``hidden`` rows only (float32)."""
    logits = model.get_output_embeddings()(hidden)
    return F.log_softmax(logits.float(), dim=-1)


def _single_token(batch: Sequence[EncodedExample]) -> bool:
    return all(len(c) == 1 for ex in batch for c in ex.candidates)


def _next_token_scores(model: PreTrainedModel, batch: Sequence[EncodedExample],
                       pad_token_id: int) -> CandidateScores:
    """Fast path: every candidate is one token; one forward of the contexts scores them all."""
    hidden = hidden_states(model, [ex.context for ex in batch], pad_token_id)
    last = torch.tensor([len(ex.context) - 1 for ex in batch], device=hidden.device)
    logp = log_probs(model, hidden[torch.arange(len(batch), device=hidden.device), last])
    ids = torch.tensor([[c[0] for c in ex.candidates] for ex in batch], device=hidden.device)
    sums = logp.gather(1, ids)
    return CandidateScores(sums, torch.ones_like(sums))


def _sequence_scores(model: PreTrainedModel, contexts: Sequence[Sequence[int]],
                     continuations: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability and token count of each continuation after its context."""
    sequences = [tuple(ctx) + tuple(cont) for ctx, cont in zip(contexts, continuations)]
    hidden = hidden_states(model, sequences, pad_token_id)
    rows: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for n, (ctx, cont) in enumerate(zip(contexts, continuations)):
        start = len(ctx) - 1  # the hidden state at position p predicts token p + 1
        rows += [n] * len(cont)
        positions += range(start, start + len(cont))
        targets += cont
    device = hidden.device
    row_index = torch.tensor(rows, device=device)
    picked = hidden[row_index, torch.tensor(positions, device=device)]
    token_logp = log_probs(model, picked).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    sums = torch.zeros(len(sequences), device=device).index_add(0, row_index, token_logp)
    counts = torch.tensor([float(len(c)) for c in continuations], device=device)
    return sums, counts


def candidate_scores(model: PreTrainedModel, batch: Sequence[EncodedExample], pad_token_id: int = 0,
                     fast_path: bool = True) -> CandidateScores:
    """Log-probabilities of every candidate of every example in ``batch`` (differentiable).

    ``fast_path`` uses one forward per example when all candidates are single tokens;
    otherwise one sequence per (example, candidate) is run.
    """
    if fast_path and _single_token(batch):
        return _next_token_scores(model, batch, pad_token_id)
    n_cand = len(batch[0].candidates)
    contexts = [ex.context for ex in batch for _ in ex.candidates]
    continuations = [cand for ex in batch for cand in ex.candidates]
    sums, counts = _sequence_scores(model, contexts, continuations, pad_token_id)
    return CandidateScores(sums.view(len(batch), n_cand), counts.view(len(batch), n_cand))


# ------------------------------------------------------------------------------------ losses

def training_loss(model: PreTrainedModel, batch: Sequence[EncodedExample], loss: str = "classification",
                  pad_token_id: int = 0, fast_path: bool = True) -> torch.Tensor:
    """The training loss of ``batch`` (a scalar tensor with gradient).

    Args:
        loss: ``"classification"``: cross-entropy of the gold label over the candidates'
            mean token log-likelihoods (the paper); ``"lm"``: mean negative log-likelihood
            of the gold answer's tokens (summed over the batch's answer tokens, divided by
            their number, as a causal-LM loss with every other label set to -100).
    """
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r} is not one of {', '.join(LOSSES)}")
    if not batch:
        raise ConfigError("training_loss got an empty batch")
    labels = [ex.label for ex in batch]
    if loss == "classification":
        scores = candidate_scores(model, batch, pad_token_id, fast_path).logprob_mean
        return F.cross_entropy(scores, torch.tensor(labels, device=scores.device))
    if fast_path and _single_token(batch):
        sums = _next_token_scores(model, batch, pad_token_id).logprob_sum
        return -sums.gather(1, torch.tensor(labels, device=sums.device)[:, None]).mean()
    gold = [ex.candidates[ex.label] for ex in batch]
    sums, counts = _sequence_scores(model, [ex.context for ex in batch], gold, pad_token_id)
    return -sums.sum() / counts.sum()


def iterate_batches(encoded: Sequence[EncodedExample], batch_size: int,
                    generator: torch.Generator | None = None) -> list[list[EncodedExample]]:
    """``encoded`` cut into batches of ``batch_size`` (the last may be smaller).

    With ``generator`` the examples are shuffled first (``torch.randperm``), reproducibly.
    Padding happens later, per batch, to the batch's longest sequence.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    order = torch.randperm(len(encoded), generator=generator).tolist() if generator else range(len(encoded))
    items = [encoded[i] for i in order]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


# ------------------------------------------------------------------------------------ evaluation

def predictions(scores: CandidateScores, candidate_chars: Sequence[int], rule: str = "mean") -> list[int]:
    """The argmax candidate of each example under ``rule`` (see :data:`RULES`)."""
    if rule == "mean":
        value = scores.logprob_mean
    elif rule == "sum":
        value = scores.logprob_sum
    elif rule == "norm":
        chars = torch.tensor([float(c) for c in candidate_chars], device=scores.logprob_sum.device)
        value = scores.logprob_sum / chars
    else:
        raise ConfigError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    return value.argmax(dim=1).tolist()


@torch.no_grad()
def score_examples(model: PreTrainedModel, encoded: Sequence[EncodedExample], batch_size: int = 8,
                   pad_token_id: int = 0, progress: bool = False, fast_path: bool = True) -> CandidateScores:
    """Candidate scores of all ``encoded`` examples, batched by similar length, in input order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].context), reverse=True)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluating", unit="batch")
    n_cand = len(encoded[0].candidates) if encoded else 0
    sums = torch.zeros(len(encoded), n_cand)
    counts = torch.zeros(len(encoded), n_cand)
    for start in starts:
        index = order[start:start + batch_size]
        scores = candidate_scores(model, [encoded[i] for i in index], pad_token_id, fast_path)
        sums[index] = scores.logprob_sum.float().cpu()
        counts[index] = scores.n_tokens.float().cpu()
    return CandidateScores(sums, counts)


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task,
             examples: Sequence[Example], batch_size: int = 8, rule: str = "mean",
             max_length: int | None = None, progress: bool = False, fast_path: bool = True) -> dict[str, Any]:
    """Score ``examples`` and report the task's metrics.

    Returns:
        ``{"n", "rule", "accuracy", ["macro_f1"], "acc_mean", "acc_sum", "acc_norm", "loss"}``:
        ``accuracy`` (and ``macro_f1`` for tasks that report it, e.g. CB) under ``rule``;
        the accuracy of each rule; ``loss`` is the classification loss (cross-entropy over
        mean token log-likelihoods).
    """
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    if not examples:
        raise ConfigError(f"{task.name}: no examples to evaluate")
    encoded = encode_examples(tokenizer, examples, task, max_length)
    was_training = model.training
    model.eval()
    try:
        scores = score_examples(model, encoded, batch_size, tokenizer.pad_token_id or 0, progress, fast_path)
    finally:
        model.train(was_training)
    return metrics(scores, encoded, task, rule)


def metrics(scores: CandidateScores, encoded: Sequence[Any], task: Task, rule: str) -> dict[str, Any]:
    """The metrics :func:`evaluate` reports, from the candidates' ``scores`` of the ``encoded`` examples."""
    labels = [e.label for e in encoded]
    chars = [len(c) for c in task.candidates]
    by_rule = {r: predictions(scores, chars, r) for r in RULES}
    result: dict[str, Any] = {"n": len(encoded), "rule": rule, "accuracy": accuracy(by_rule[rule], labels)}
    if "macro_f1" in task.metrics:
        result["macro_f1"] = macro_f1(by_rule[rule], labels)
    result.update({f"acc_{r}": accuracy(p, labels) for r, p in by_rule.items()})
    result["loss"] = F.cross_entropy(scores.logprob_mean, torch.tensor(labels)).item()
    return result
