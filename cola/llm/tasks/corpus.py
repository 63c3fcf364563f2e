"""The corpus task (``--task corpus``): language modelling on raw text, its documents split by document and packed
into blocks (:mod:`cola.llm.tasks.blocks`), scored by held-out perplexity, with the forgetting on reference text.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cola.io import markdown_table
from cola.llm.tasks import blocks
from cola.llm.tasks import corpus_sources, token_cache
from cola.llm.tasks.corpus_sources import EMBEDDED_CORPORA, EMBEDDED_PREFIX, embedded_name_problem
from cola.llm.tasks.kind import ExampleSize, Inputs, TaskKind, TextTask, checked_steps
from cola.llm.tasks.references import (ForgettingTexts, ReferenceScoring, StartPoint, cached, forgetting_texts,
                                       kl_text, reference_problems, tokenizer_id)
from cola.llm.tasks.tables import finish_markdown, forgetting_lines, pm

log = logging.getLogger(__name__)

CORPUS = "corpus"
"""The task name of language modelling on raw text."""


@dataclass(frozen=True, eq=False)
class EvalSet:
    """What one evaluation of a corpus run scores: held-out domain blocks, reference blocks, and (the test)
    the other references."""

    domain: blocks.Blocks
    reference: blocks.Blocks
    more: dict[str, blocks.Blocks] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.domain.n_blocks


@dataclass(frozen=True, eq=False)
class CorpusData:
    """A seed's corpus splits, shaped like a classification task's ``Splits``: ``train`` is the list
    of training blocks (the loop's examples), ``validation`` and ``test`` are :class:`EvalSet`."""

    train: list[torch.Tensor]
    validation: EvalSet
    test: EvalSet
    summary: dict

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": self.validation.domain.n_blocks,
                "test": self.test.domain.n_blocks, "reference": self.test.reference.n_blocks}


def load_corpus_data(settings: Any, tokenizer, seeds: list[int]
                     ) -> tuple[TextTask, dict[int, CorpusData], ForgettingTexts]:
    """The documents of ``settings.train_file`` (default: the Python standard library) and the forgetting texts
    (:func:`forgetting_texts`), tokenised once, split by document and packed for each seed."""
    block = settings.max_length
    text = cached(("read", settings.train_file, settings.files, settings.text_field),
                  lambda: corpus_sources.load_corpus(settings.train_file, settings.files, settings.text_field),
                  settings.train_file)
    kept = forgetting_texts(settings, tokenizer, block, settings.n_test)
    encoded = cached(("encode", text.info.fingerprint, tokenizer_id(tokenizer)),
                     lambda: token_cache.encoded_documents(text.documents, text.info.fingerprint, tokenizer,
                                                           settings.train_file))
    reference = kept.reference
    reference_val = reference.evenly(settings.n_val)
    data = {}
    for seed in seeds:
        def make(seed=seed):
            split = blocks.prepare_corpus(text.documents, tokenizer, block, settings.n_val, settings.n_test, seed=seed,
                                          test_seed=settings.test_seed, encoded=encoded)
            return split, list(split.train.input_ids)

        split, train = cached(("split", text.info.fingerprint, tokenizer_id(tokenizer), block, settings.n_val,
                               settings.n_test, seed, settings.test_seed), make, settings.train_file)   # cells share it
        summary = split.summary()
        summary["train"]["documents"] = None  # the held-out documents are named; the rest are training
        data[seed] = CorpusData(train, EvalSet(split.validation, reference_val),
                                EvalSet(split.test, reference, kept.more), summary)
    info = {"corpus": text.info.to_dict(), **kept.info}
    return TextTask(CORPUS, info), data, kept


@dataclass
class CorpusEvaluator(ReferenceScoring):
    """Scores a corpus run: held-out perplexity of the domain blocks and of the reference text, and the KL to
    the start on it (:class:`EvalSet`); the same call signature as
    :class:`cola.llm.tasks.classification.Evaluator`."""

    settings: Any
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
                 result["reference_perplexity"], kl_text(result), result["seconds"])
        return result


class CorpusKind(TaskKind):
    """``--task corpus``."""

    name = CORPUS
    description = "raw text"
    objective = "blocks"
    primary_metric = "perplexity"
    metrics = ("perplexity", "loss", "bits_per_byte", "forgetting", "reference_perplexity")
    keeps = True
    #: blocks of max_length tokens; n_val / n_test count held-out blocks; every training block is used: the
    #: embedded model on CPU, and every other model
    embedded_profile = {"n_train": None, "n_val": 32, "n_test": 128, "steps": 120, "max_length": 64}
    paper_profile = {"n_train": None, "n_val": 64, "n_test": 256, "steps": 1000, "max_length": 512}

    def problems(self, v: Any) -> list[str]:
        p = ["train_paraphrases is for --task facts (the phrasings of its facts)"] if v.train_paraphrases else []
        for name, why in (("template", "it trains on raw text, no prompt"), ("answers", "it has no answers"),
                          ("test_file", "its test documents are held out of --train-file"),
                          ("data_dir", "it reads --train-file (a file or a folder)")):
            if getattr(v, name) is not None:
                p.append(f"{name} is not for --task corpus ({why})")
        value = v.train_file
        if value and value.startswith(EMBEDDED_PREFIX):
            problem = embedded_name_problem(value)
            if problem:
                p.append(f"train_file={problem}")
        elif value and not Path(value).exists():
            p.append(f"train_file={value!r}: no such file or folder (or embedded:NAME, one of "
                     f"{', '.join(EMBEDDED_CORPORA)})")
        return p + reference_problems(v)

    def inputs(self, settings: Any, model, tokenizer) -> Inputs:
        task, splits, kept = load_corpus_data(settings, tokenizer, settings.seeds)
        return Inputs(task, splits, {s: d.train for s, d in splits.items()}, settings.max_length,
                      checked_steps(settings, len(splits[settings.seeds[0]].train)), kept)

    def sizes(self, settings: Any, inputs: Inputs) -> ExampleSize:
        """A block: every one of its tokens goes through the body and the LM head."""
        n = float(inputs.max_length)
        return ExampleSize(n, n, n, n)

    def evaluator(self, settings: Any, tokenizer, inputs: Inputs, progress: bool, start: Any) -> "CorpusEvaluator":
        return CorpusEvaluator(settings, blocks.special_ids(tokenizer)[0], progress, start)

    def markdown(self, results: dict[str, Any]) -> str:
        """The table: held-out perplexity after each link, test perplexity, bits per byte, the reference text's
        perplexity, the forgetting (its loss's rise over zero-shot) and the KL to the start."""
        settings, plan = results["settings"], results["plan"]
        zero = results["zero_shot"]["test"]
        lines = [f"### corpus on {settings['model']}: held-out perplexity ({zero['n']} test blocks of "
                 f"{plan['max_length']} tokens), {plan['total_steps']} steps of {plan['examples_per_step']} blocks, "
                 f"seeds {', '.join(map(str, settings['seeds']))}", ""]
        header = ["method", "links", "ranks", "trainable", "validation ppl after each link", "test ppl", "bits/byte",
                  "reference ppl", "forgetting (nats)", "KL to the start", "train s/run"]
        table = [["zero-shot", "–", "–", "0", "–", f"{zero['perplexity']:.3f}", f"{zero['bits_per_byte']:.4f}",
                  f"{zero['reference_perplexity']:.3f}", "0", "0", "–"]]
        for method, entry in results.get("summary", {}).items():
            p = plan["methods"][method]
            curve = " → ".join(f"{c['mean']:.2f}" for c in entry["validation_curve"]) or "–"
            table.append([method, str(p["links"]), "/".join(map(str, p["ranks"])) if p["ranks"] else "all",
                          f"{entry['trainable_params']:,}", curve, pm(entry.get("test_perplexity")),
                          pm(entry.get("test_bits_per_byte"), 4), pm(entry.get("test_reference_perplexity")),
                          pm(entry.get("test_forgetting"), 4), pm(entry.get("test_reference_kl"), 4),
                          f"{entry['train_seconds']['mean']:.0f}"])
        lines += [markdown_table(header, table), "",
                  "Forgetting: the rise of the loss on the reference text (never trained on) over zero-shot, in nats "
                  "per token; KL to the start: the mean KL divergence from the starting model's next-token "
                  "distributions to the tuned one's on the same text (0 for the starting model; replay cannot hide "
                  "it); lower perplexity, forgetting and KL are better.", ""]
        return finish_markdown(results, forgetting_lines(results, lines, self.primary_metric))

    def headline(self, results: dict[str, Any]) -> str:
        zero = results["zero_shot"]["test"]
        parts = [f"zero-shot {zero['perplexity']:.3f}"] + [
            f"{m} {pm(e.get('test_perplexity'))} (forgetting {pm(e.get('test_forgetting'), 4)}, KL "
            f"{pm(e.get('test_reference_kl'), 4)})"
            for m, e in results.get("summary", {}).items()]
        return f"corpus test perplexity (n={zero['n']} blocks): " + " | ".join(parts)

    def task_line(self, plan: dict[str, Any], sizes: dict[str, int]) -> str:
        text, ref = plan["corpus"]["corpus"], plan["corpus"]["reference"]
        split = next(iter(plan["corpus"]["splits"].values()))
        return (f"task corpus: {text['description']} ({text['n_documents']:,} documents, {text['n_bytes']:,} bytes), "
                f"split by document into {sizes['train']:,} train / {sizes['validation']} validation / "
                f"{sizes['test']} test blocks of {plan['max_length']} tokens (held out: "
                f"{split['validation']['n_documents']} and {split['test']['n_documents']} documents); forgetting on "
                f"{sizes['reference']} blocks of {ref['description']}")


KIND = CorpusKind()
