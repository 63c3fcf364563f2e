"""The facts task (``--task facts``): knowledge injection. Each fact is a prompt and its answer (and more
phrasings, :mod:`cola.llm.tasks.facts_sources`), trained with the answer tokens' NLL and scored by exact-match
recall under greedy decoding, on its prompt and on phrasings never trained on
(:mod:`cola.llm.tasks.facts_scoring`), with the forgetting on reference text beside it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cola.distributed as cd
from cola.errors import ConfigError
from cola.io import markdown_table
from cola.llm.objective import EncodedExample, default_max_length
from cola.llm.parallel import as_forward, is_sharded
from cola.llm.tasks import blocks, facts_scoring
from cola.llm.tasks.facts_sources import (SYNTHETIC_PREFIX, Fact, FactSet, facts_summary, fingerprint, load_facts,
                                          parse_synthetic, split_phrasings)
from cola.llm.tasks.kind import Inputs, TaskKind, TextTask, checked_steps
from cola.llm.tasks.references import (ForgettingTexts, ReferenceScoring, StartPoint, cached, forgetting_texts,
                                       kl_text, reference_problems, tokenizer_id)
from cola.llm.tasks.tables import finish_markdown, forgetting_lines, pm

log = logging.getLogger(__name__)

FACTS = "facts"
"""The task name of knowledge injection."""

#: the length of the reference text's blocks that a facts run's forgetting is measured on (and of its replay)
FACTS_REFERENCE_BLOCK = 64


@dataclass(frozen=True, eq=False)
class FactsEvalSet:
    """What one evaluation of a facts run scores: the facts (and their paraphrases never trained on), reference
    blocks, and (the test) the other references."""

    facts: tuple[Fact, ...]
    encoded: list[EncodedExample]
    paraphrases: list[EncodedExample]
    reference: blocks.Blocks
    more: dict[str, blocks.Blocks] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True, eq=False)
class FactsData:
    """A seed's facts, shaped like a classification task's ``Splits``: ``train`` is every trained phrasing of
    every fact (encoded: the loop's examples), ``validation`` the facts scored after every link, ``test`` all of
    them."""

    train: list[EncodedExample]
    validation: FactsEvalSet
    test: FactsEvalSet
    summary: dict

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test),
                "paraphrases": len(self.test.paraphrases), "reference": self.test.reference.n_blocks}


def _facts_taught(settings: Any) -> FactSet:
    """The facts of ``settings.train_file`` (``n_train`` of them, drawn by ``test_seed``, when it is set)."""
    found = cached(("facts", settings.train_file, settings.test_seed, settings.prompt_field, settings.answer_field,
                     settings.paraphrases_field),
                    lambda: load_facts(settings.train_file, settings.test_seed, settings.prompt_field,
                                       settings.answer_field, settings.paraphrases_field),
                    None if str(settings.train_file).startswith("synthetic:") else settings.train_file)
    if settings.n_train is None or settings.n_train >= len(found):
        return found
    pick = sorted(np.random.default_rng([settings.test_seed, 3]).permutation(len(found))[:settings.n_train])
    chosen = tuple(found.facts[i] for i in pick)
    return FactSet(chosen, {**found.info, "n_facts": len(chosen), "n_of": len(found)})


def load_facts_data(settings: Any, tokenizer, seeds: list[int], max_length: int | None
                    ) -> tuple[TextTask, dict[int, FactsData], ForgettingTexts]:
    """The facts taught, encoded once, and the forgetting texts (:func:`forgetting_texts`) in blocks.

    Every seed is taught the same facts (their order is the seed's): each fact's prompt and, with
    ``train_paraphrases`` K, K more of its phrasings (:func:`cola.llm.tasks.facts_sources.split_phrasings`). The
    validation facts are ``n_val`` of them, evenly spaced (all by default), with their held-out paraphrases only
    when some are trained on (so that tuning can read their recall); the test facts all of them with every
    paraphrase never trained on. Recall is scored on the facts' own prompts.
    """
    taught = _facts_taught(settings)
    k = settings.train_paraphrases
    split = [split_phrasings(f, k) for f in taught.facts]
    if k and not any(held for _, held in split):
        raise ConfigError(f"train_paraphrases={k}: no fact keeps a paraphrase that is never trained on (the most "
                          f"phrasings a fact has is {max(len(f.phrasings) + len(f.paraphrases) for f in taught.facts)}"
                          "); train on fewer")
    held = [held for _, held in split]

    def encode():   # once per facts, tokenizer, length and K in a process (a sweep's cells share them)
        return (facts_scoring.encode_facts(tokenizer, taught.facts, max_length),
                facts_scoring.encode_phrasings(tokenizer, taught.facts, [trained for trained, _ in split], max_length),
                facts_scoring.encode_phrasings(tokenizer, taught.facts, held, max_length))

    prompts, extra, paraphrases = cached(("facts-encoded", fingerprint(taught.facts), tokenizer_id(tokenizer),
                                          max_length, k), encode, None)
    train = prompts + extra
    kept = forgetting_texts(settings, tokenizer, FACTS_REFERENCE_BLOCK, settings.n_test)
    reference = kept.reference
    test = FactsEvalSet(taught.facts, prompts, paraphrases, reference, kept.more)
    # after every link: the facts (all, or n_val evenly spaced) and the reference; paraphrases at the end only,
    # unless some are trained on
    keep = blocks.evenly_spaced(len(prompts), len(prompts) if settings.n_val is None else settings.n_val).tolist()
    starts = np.cumsum([0] + [len(h) for h in held])   # fact i's held-out paraphrases: paraphrases[starts[i]:...]
    val_paraphrases = [e for i in keep for e in paraphrases[starts[i]:starts[i + 1]]] if k else []
    validation = FactsEvalSet(tuple(taught.facts[i] for i in keep), [prompts[i] for i in keep], val_paraphrases,
                              reference if settings.n_val is None else reference.evenly(settings.n_val))
    summary = {"facts": facts_summary(taught), "validation_facts": len(validation),
               "trained_phrasings": len(train), "held_out_paraphrases": len(paraphrases),
               "reference": {**reference.summary(), "documents": None}}
    info = {"facts": summary["facts"], "train_paraphrases": k, **kept.info}
    return TextTask(FACTS, info), {seed: FactsData(train, validation, test, summary) for seed in seeds}, kept


@dataclass
class FactsEvaluator(ReferenceScoring):
    """Scores a facts run (:class:`FactsEvalSet`): recall, token accuracy and answer loss
    of the facts and of their paraphrases, which facts were recalled, and the reference text's loss
    (forgetting) and KL to the start; the same call signature as
    :class:`cola.llm.tasks.classification.Evaluator`.

    Under torchrun the facts, the paraphrases and the reference blocks are split over the ranks (each scores a
    contiguous slice; under FSDP a rank with fewer batches runs a filler one, since every forward is a
    collective) and the scores gathered: the same numbers on every rank, and as one process gives."""

    settings: Any
    eos_id: int
    start: StartPoint | None = None

    def answers(self, model, encoded, pad: int) -> facts_scoring.AnswerScores:
        """:func:`cola.llm.tasks.facts_scoring.score_answers` of ``encoded``, split over the ranks when
        data-parallel."""
        size = self.settings.eval_batch_size
        if not cd.is_distributed():
            return as_forward(model, lambda: facts_scoring.score_answers(model, encoded, size, pad))
        import torch.distributed as dist

        mine = cd.shard(list(range(len(encoded))))
        fillers = (math.ceil(max(cd.shard_sizes(len(encoded))) / size) - math.ceil(len(mine) / size)
                   if is_sharded(model) else 0)

        def score() -> facts_scoring.AnswerScores:   # under FSDP as many forwards on every rank, in one root forward
            scores = facts_scoring.score_answers(model, [encoded[i] for i in mine], size, pad)
            for _ in range(fillers):
                facts_scoring.score_answers(model, encoded[:1], size, pad)
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
        return facts_scoring.AnswerScores(n_tokens, n_correct, nll)

    def __call__(self, model, tokenizer, evalset, what: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        pad = tokenizer.pad_token_id or 0
        scores = self.answers(model, evalset.encoded, pad)
        result = {**facts_scoring.answer_metrics(scores), "recalled": facts_scoring.recalled_text(scores)}
        if evalset.paraphrases:
            para = self.answers(model, evalset.paraphrases, pad)
            result.update(facts_scoring.answer_metrics(para, "paraphrase_"))
        result.update(self.references(model, evalset))
        result["seconds"] = time.perf_counter() - t0
        paraphrased = (f", paraphrases {result['paraphrase_recall']:.4f} (n={result['paraphrase_n']})"
                       if "paraphrase_recall" in result else "")
        log.info("%s: recall %.4f (token accuracy %.4f, answer loss %.4f; n=%d facts)%s; reference perplexity %.3f%s "
                 "in %.1f s", what, result["recall"], result["token_accuracy"], result["answer_loss"], result["n"],
                 paraphrased, result["reference_perplexity"], kl_text(result), result["seconds"])
        return result


class FactsKind(TaskKind):
    """``--task facts``."""

    name = FACTS
    description = "knowledge injection"
    objective = "lm"
    primary_metric = "recall"
    metrics = ("recall", "token_accuracy", "answer_loss", "paraphrase_recall", "forgetting", "reference_perplexity")
    keeps = True
    #: every fact trained on and scored; n_val: facts scored after every link, all by default; n_test: blocks of
    #: the reference text its forgetting is measured on
    embedded_profile = {"n_train": None, "n_val": None, "n_test": 64, "epochs": 20.0, "max_length": 96}
    paper_profile = {"n_train": None, "n_val": None, "n_test": 256, "epochs": 20.0, "max_length": None}

    def problems(self, v: Any) -> list[str]:
        p = []
        for name, why in (("template", "each fact is its own prompt"), ("answers", "each fact has its own answer"),
                          ("test_file", "every fact of --train-file is trained on and tested"),
                          ("data_dir", "it reads --train-file"), ("label_field", "a fact's answer is its label")):
            if getattr(v, name) is not None:
                p.append(f"{name} is not for --task facts ({why})")
        value = v.train_file
        if not value:
            p.append("task 'facts' needs --train-file: a jsonl/json/csv/parquet table of facts (prompt, answer[, "
                     "paraphrases]) or synthetic:N for N invented facts")
        elif value.startswith(SYNTHETIC_PREFIX):
            try:
                parse_synthetic(value)
            except ConfigError as err:
                p += err.problems
        elif not Path(value).is_file():
            p.append(f"train_file={value!r}: no such file (or synthetic:N for N invented facts)")
        for name in ("prompt_field", "answer_field", "paraphrases_field"):
            if not getattr(v, name):
                p.append(f"{name}: give a column name")
        return p + reference_problems(v)

    def inputs(self, settings: Any, model, tokenizer) -> Inputs:
        max_length = settings.max_length if settings.max_length is not None else default_max_length(model, tokenizer)
        task, splits, kept = load_facts_data(settings, tokenizer, settings.seeds, max_length)
        return Inputs(task, splits, {s: d.train for s, d in splits.items()}, max_length,
                      checked_steps(settings, len(splits[settings.seeds[0]].train)), kept)

    def evaluator(self, settings: Any, tokenizer, inputs: Inputs, progress: bool, start: Any) -> "FactsEvaluator":
        return FactsEvaluator(settings, blocks.special_ids(tokenizer)[0], start)

    def markdown(self, results: dict[str, Any]) -> str:
        """The table: recall after each link, test recall, token accuracy, answer loss, recall on the paraphrases,
        the forgetting and the KL to the start; then, per method, what each link did to the facts recalled
        before."""
        settings, plan = results["settings"], results["plan"]
        zero = results["zero_shot"]["test"]
        lines = [f"### facts on {settings['model']}: exact-match recall of {zero['n']} facts taught "
                 f"({plan['facts']['facts']['source']}), {plan['total_steps']} steps of {plan['examples_per_step']} "
                 f"facts "
                 f"({plan['epochs']:.1f} epochs), seeds {', '.join(map(str, settings['seeds']))}", ""]
        header = ["method", "links", "ranks", "trainable", "recall after each link", "test recall", "token acc",
                  "answer loss", "paraphrase recall", "forgetting (nats)", "KL to the start", "train s/run"]
        table = [["zero-shot", "–", "–", "0", "–", f"{zero['recall']:.3f}", f"{zero['token_accuracy']:.3f}",
                  f"{zero['answer_loss']:.3f}",
                  f"{zero['paraphrase_recall']:.3f}" if "paraphrase_recall" in zero else "–",
                  "0", "0", "–"]]
        retained = []
        for method, entry in results.get("summary", {}).items():
            p = plan["methods"][method]
            curve = " → ".join(f"{c['mean']:.3f}" for c in entry["validation_curve"]) or "–"
            table.append([method, str(p["links"]), "/".join(map(str, p["ranks"])) if p["ranks"] else "all",
                          f"{entry['trainable_params']:,}", curve, pm(entry.get("test_recall")),
                          pm(entry.get("test_token_accuracy")), pm(entry.get("test_answer_loss")),
                          pm(entry.get("test_paraphrase_recall")), pm(entry.get("test_forgetting"), 4),
                          pm(entry.get("test_reference_kl"), 4), f"{entry['train_seconds']['mean']:.0f}"])
            for link in entry.get("retention", [])[1:]:
                retained.append([method, str(link["after_link"]), pm(link["kept"], 1), pm(link["lost"], 1),
                                 pm(link["new"], 1), pm(link["kept_fraction"])])
        lines += [markdown_table(header, table), "",
                  "Recall: the fraction of facts whose whole answer greedy decoding gives (every answer token the "
                  "argmax); paraphrase recall: on the phrasings never trained on; forgetting: the rise of the "
                  "reference text's loss over zero-shot, in nats per token; KL to the start: the mean KL divergence "
                  "from the starting model's next-token distributions to the tuned one's on the same text.", ""]
        lines = forgetting_lines(results, lines, self.primary_metric)
        if retained:
            lines += ["Link by link (validation facts, mean ± std over seeds): kept = recalled before the link and "
                      "after it, lost = recalled before only, new = recalled after only.", "",
                      markdown_table(["method", "after link", "kept", "lost", "new", "kept / recalled before"],
                                     retained),
                      ""]
        return finish_markdown(results, lines)

    def headline(self, results: dict[str, Any]) -> str:
        zero = results["zero_shot"]["test"]
        parts = [f"zero-shot {zero['recall']:.3f}"] + [
            f"{m} {pm(e.get('test_recall'))} (forgetting {pm(e.get('test_forgetting'), 4)}, KL "
            f"{pm(e.get('test_reference_kl'), 4)})"
            for m, e in results.get("summary", {}).items()]
        return f"facts recall (n={zero['n']} facts): " + " | ".join(parts)

    def task_line(self, plan: dict[str, Any], sizes: dict[str, int]) -> str:
        facts = plan["facts"]["facts"]
        return (f"task facts: {sizes['train']} facts from {facts['source']} (fingerprint {facts['fingerprint']}), "
                f"every one trained on and tested, {sizes['validation']} scored after every link, "
                f"{sizes['paraphrases']} paraphrased prompts tested; {plan['tokens_per_example']:.1f} tokens per fact "
                f"on average; forgetting on {sizes['reference']} blocks of "
                f"{plan['facts']['reference']['description']}")


KIND = FactsKind()
