"""Evaluation inside ``cola train``: one timed, logged scoring call, sharded over the ranks when
data-parallel, and the zero-shot scores of the base model (computed once per output folder).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import cola.distributed as cd
from cola.errors import ConfigError
from cola.io import write_json
from cola.llm import corpus, divergence, facts
from cola.llm.divergence import StartDistributions
from cola.llm.objective import CandidateScores, candidate_scores, encode_examples, evaluate, metrics
from cola.llm.parallel import as_forward, is_sharded, on_main
from cola.llm.settings import TrainSettings
from cola.llm.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    """Scores examples of ``task`` the way ``settings`` asks (batch size, rule, max length)."""

    settings: TrainSettings
    task: Task
    max_length: int | None
    progress: bool = False

    def __call__(self, model, tokenizer, examples, what: str) -> dict[str, Any]:
        """The task's metrics on ``examples`` (plus ``seconds``), logged as ``what``."""
        start = time.perf_counter()
        if cd.is_distributed():
            result = self.sharded(model, tokenizer, examples)
        else:
            s = self.settings
            result = as_forward(model, lambda: evaluate(model, tokenizer, self.task, examples, s.eval_batch_size,
                                                        s.eval_rule, self.max_length, progress=self.progress))
        result["seconds"] = time.perf_counter() - start
        log.info("%s: accuracy %.4f (rule %s; acc_mean %.4f, acc_sum %.4f, acc_norm %.4f; n=%d) in %.1f s", what,
                 result["accuracy"], result["rule"], result["acc_mean"], result["acc_sum"], result["acc_norm"],
                 result["n"], result["seconds"])
        return result

    def sharded(self, model, tokenizer, examples) -> dict[str, Any]:
        """:func:`cola.llm.objective.evaluate` with the examples split over the ranks: each scores its
        contiguous slice (batched by length), the scores are gathered, and every rank computes the same
        metrics from all of them. Under FSDP every rank runs the same number of forwards (a rank with
        one batch fewer runs a filler batch), since each is a collective."""
        import torch.distributed as dist

        if not examples:
            raise ConfigError(f"{self.task.name}: no examples to evaluate")
        encoded = encode_examples(tokenizer, examples, self.task, self.max_length)
        mine = sorted(cd.shard(list(range(len(encoded)))), key=lambda i: len(encoded[i].context), reverse=True)
        size = self.settings.eval_batch_size
        n_batches = math.ceil(max(cd.shard_sizes(len(encoded))) / size)
        pad = tokenizer.pad_token_id or 0
        sharded = is_sharded(model)
        parts = []

        def score() -> None:
            for b in range(n_batches):
                index = mine[b * size:(b + 1) * size]
                if index:
                    s = candidate_scores(model, [encoded[i] for i in index], pad)
                    parts.append((index, s.logprob_sum.float().cpu(), s.n_tokens.float().cpu()))
                elif sharded:
                    candidate_scores(model, encoded[:1], pad)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                as_forward(model, score)
        finally:
            model.train(was_training)
        gathered: list[Any] = [None] * cd.world_size()
        dist.all_gather_object(gathered, parts)
        n_cand = len(encoded[0].candidates)
        sums, counts = torch.zeros(len(encoded), n_cand), torch.zeros(len(encoded), n_cand)
        for rank_parts in gathered:
            for index, s, n in rank_parts:
                sums[index], counts[index] = s, n
        return metrics(CandidateScores(sums, counts), encoded, self.task, self.settings.eval_rule)


#: start distributions computed in this process, by (weights, blocks, batch size, k): a sweep's runs share them
_STARTS: dict[tuple, StartDistributions] = {}


class StartPoint:
    """Where a corpus or facts run started: the starting model's distributions on each reference text (and
    on the replay pool for ``--replay-loss kl``), computed once before training (:mod:`cola.llm.divergence`),
    from which the evaluations read the KL to the start."""

    def __init__(self, settings: TrainSettings):
        self.batch_size, self.k = settings.eval_batch_size, settings.kl_top_k
        self.found: dict[int, tuple[Any, StartDistributions]] = {}

    def compute(self, model, blocks, weights: str | None = None) -> StartDistributions:
        """The start's distributions on ``blocks`` (:class:`cola.llm.corpus.Blocks`), computed once; ``weights``
        (:func:`cola.llm.divergence.weights_fingerprint` of ``model``) lets a later experiment of this process
        (the next run of a sweep) on the same weights and blocks reuse them."""
        if id(blocks) not in self.found:
            key = (weights, divergence.ids_fingerprint(blocks.input_ids), self.batch_size, self.k)
            dist = _STARTS.get(key) if weights is not None else None
            if dist is None:
                dist = as_forward(model, lambda: divergence.start_distributions(model, blocks.input_ids,
                                                                                self.batch_size, self.k))
                if weights is not None:
                    while len(_STARTS) >= 8:
                        _STARTS.pop(next(iter(_STARTS)))
                    _STARTS[key] = dist
            self.found[id(blocks)] = (blocks, dist)
        return self.found[id(blocks)][1]

    def get(self, blocks) -> StartDistributions | None:
        entry = self.found.get(id(blocks))
        return entry[1] if entry is not None else None


_REFERENCE_KEYS = ("loss", "perplexity", "bits_per_byte", "tokens", "n_blocks")


class _ReferenceScoring:
    """The reference texts' part of an evaluation: loss (and perplexity, bits per byte) and KL to the start of
    the reference, and of the other references of a test set."""

    settings: TrainSettings
    eos_id: int
    start: StartPoint | None

    def score(self, model, blocks, boundary: int | None) -> dict[str, Any]:
        """:func:`cola.llm.corpus.evaluate_corpus` (with the KL to the start where it is known), split over the
        ranks when data-parallel (every rank runs as many forwards, a filler one when its slice is shorter:
        under FSDP each is a collective)."""
        size = self.settings.eval_batch_size
        start = self.start.get(blocks) if self.start is not None else None
        if not cd.is_distributed():
            return as_forward(model, lambda: corpus.evaluate_corpus(model, blocks, size, boundary_id=boundary,
                                                                    start=start))
        import torch.distributed as dist

        mine = cd.shard(list(range(blocks.n_blocks)))
        n_batches = math.ceil(max(cd.shard_sizes(blocks.n_blocks)) / size)
        sums = torch.zeros(4, dtype=torch.float64)
        for b in range(n_batches):
            index = mine[b * size:(b + 1) * size]
            rows = index if index else [0]
            part = blocks.select(rows)
            part_start = start.rows(torch.tensor(rows)) if start is not None else None
            r = as_forward(model, lambda: corpus.evaluate_corpus(model, part, size, boundary_id=boundary,
                                                                 start=part_start))
            if index:
                sums += torch.tensor([r["loss"] * r["tokens"], r["tokens"], r["bytes"] or 0,
                                      r.get("kl", 0.0) * r["tokens"]], dtype=torch.float64)
        sums = sums.to(cd.device())
        dist.all_reduce(sums)
        total, tokens, n_bytes, kl = sums.tolist()
        loss = total / tokens
        result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                  "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None, "tokens": int(tokens),
                  "bytes": int(n_bytes), "n_blocks": blocks.n_blocks}
        if start is not None:
            result["kl"] = kl / tokens
        return result

    def references(self, model, evalset) -> dict[str, Any]:
        """``reference_loss`` (...) and ``reference_kl`` of the reference, and ``more_references`` (per source:
        ``loss``, ``kl``) of the other references of ``evalset``. The references are many short documents: their
        boundaries are left out (their prediction is the packing format, which fine-tuning learns, not the text)."""
        reference = self.score(model, evalset.reference, self.eos_id)
        result = {f"reference_{k}": reference[k] for k in _REFERENCE_KEYS}
        if "kl" in reference:
            result["reference_kl"] = reference["kl"]
        more = getattr(evalset, "more", None) or {}
        if more:
            result["more_references"] = {}
            for source, blocks in more.items():
                r = self.score(model, blocks, self.eos_id)
                result["more_references"][source] = {"loss": r["loss"], "kl": r.get("kl")}
        return result


def _kl_text(result: dict[str, Any]) -> str:
    return f", KL to the start {result['reference_kl']:.4f}" if result.get("reference_kl") is not None else ""


@dataclass
class CorpusEvaluator(_ReferenceScoring):
    """Scores a corpus run: held-out perplexity of the domain blocks and of the reference text, and the KL to
    the start on it (:class:`cola.llm.inputs.EvalSet`); the same call signature as :class:`Evaluator`."""

    settings: TrainSettings
    eos_id: int
    progress: bool = False
    start: StartPoint | None = None

    def __call__(self, model, tokenizer, evalset, what: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        domain = self.score(model, evalset.domain, None)
        result = {**domain, **self.references(model, evalset), "n": domain["n_blocks"]}
        result.pop("kl", None)
        result["seconds"] = time.perf_counter() - t0
        log.info("%s: perplexity %.3f (loss %.4f, %.4f bits/byte; n=%d blocks); reference perplexity %.3f%s in %.1f s",
                 what, result["perplexity"], result["loss"], result["bits_per_byte"] or math.nan, result["n"],
                 result["reference_perplexity"], _kl_text(result), result["seconds"])
        return result


@dataclass
class FactsEvaluator(_ReferenceScoring):
    """Scores a facts run (:class:`cola.llm.inputs.FactsEvalSet`): recall, token accuracy and answer loss
    of the facts and of their paraphrases, which facts were recalled, and the reference text's loss
    (forgetting) and KL to the start; the same call signature as :class:`Evaluator`.

    Under torchrun the facts, the paraphrases and the reference blocks are split over the ranks (each scores a
    contiguous slice; under FSDP a rank with fewer batches runs a filler one, since every forward is a
    collective) and the scores gathered: the same numbers on every rank, and as one process gives."""

    settings: TrainSettings
    eos_id: int
    start: StartPoint | None = None

    def answers(self, model, encoded, pad: int) -> facts.AnswerScores:
        """:func:`cola.llm.facts.score_answers` of ``encoded``, split over the ranks when data-parallel."""
        size = self.settings.eval_batch_size
        if not cd.is_distributed():
            return as_forward(model, lambda: facts.score_answers(model, encoded, size, pad))
        import torch.distributed as dist

        mine = cd.shard(list(range(len(encoded))))
        fillers = (math.ceil(max(cd.shard_sizes(len(encoded))) / size) - math.ceil(len(mine) / size)
                   if is_sharded(model) else 0)

        def score() -> facts.AnswerScores:   # under FSDP as many forwards on every rank, in one root forward
            scores = facts.score_answers(model, [encoded[i] for i in mine], size, pad)
            for _ in range(fillers):
                facts.score_answers(model, encoded[:1], size, pad)
            return scores

        part = as_forward(model, score)
        gathered: list[Any] = [None] * cd.world_size()
        dist.all_gather_object(gathered, (mine, part.n_tokens, part.n_correct, part.nll))
        n_tokens = torch.zeros(len(encoded), dtype=torch.long)
        n_correct = torch.zeros(len(encoded), dtype=torch.long)
        nll = torch.zeros(len(encoded), dtype=torch.float64)
        for index, tokens, correct, loss in gathered:
            if index:
                n_tokens[index], n_correct[index], nll[index] = tokens, correct, loss
        return facts.AnswerScores(n_tokens, n_correct, nll)

    def __call__(self, model, tokenizer, evalset, what: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        pad = tokenizer.pad_token_id or 0
        scores = self.answers(model, evalset.encoded, pad)
        result = {**facts.answer_metrics(scores), "recalled": facts.recalled_text(scores)}
        if evalset.paraphrases:
            para = self.answers(model, evalset.paraphrases, pad)
            result.update(facts.answer_metrics(para, "paraphrase_"))
        result.update(self.references(model, evalset))
        result["seconds"] = time.perf_counter() - t0
        paraphrased = (f", paraphrases {result['paraphrase_recall']:.4f} (n={result['paraphrase_n']})"
                       if "paraphrase_recall" in result else "")
        log.info("%s: recall %.4f (token accuracy %.4f, answer loss %.4f; n=%d facts)%s; reference perplexity %.3f%s "
                 "in %.1f s", what, result["recall"], result["token_accuracy"], result["answer_loss"], result["n"],
                 paraphrased, result["reference_perplexity"], _kl_text(result), result["seconds"])
        return result


def zero_shot(evaluator: Evaluator, host, out: Path, splits: dict) -> dict[str, Any]:
    """Zero-shot scores of the base model: test once (the same for every seed), validation per seed.

    Cached in ``out/zero_shot.json`` (rank 0 reads and writes it). Under FSDP the base model is
    scored sharded (:meth:`ModelHost.sharded_base`), then reloaded.
    """
    settings = evaluator.settings
    path = out / "zero_shot.json"
    cached = on_main(lambda: json.loads(path.read_text()) if path.is_file() else {"test": None, "validation": {}})
    seeds = list(splits)
    scored = settings.eval_links or bool(settings.eval_every)   # the validation split's zero-shot point is needed
    missing = cached["test"] is None or (scored
                                         and any(str(seed) not in cached["validation"] for seed in seeds))
    if missing:
        model, tokenizer = host.sharded_base(settings) if host.fsdp else host.get()
        write = cd.is_main_process()
        if cached["test"] is None:
            cached["test"] = evaluator(model, tokenizer, splits[seeds[0]].test, "zero-shot test")
            if write:
                write_json(path, cached)
        for seed in seeds if scored else []:
            if str(seed) not in cached["validation"]:
                cached["validation"][str(seed)] = evaluator(model, tokenizer, splits[seed].validation,
                                                            f"zero-shot validation (seed {seed})")
                if write:
                    write_json(path, cached)
        if host.fsdp:
            host.restore()
    return {"test": cached["test"], "validation": {int(s): v for s, v in cached["validation"].items()}}
