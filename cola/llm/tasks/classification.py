"""The classification tasks (SST-2, RTE, ..., tweets, or ``custom`` from a template and answers): MeZO's
splits of labelled examples, each scored by the log-probability of every answer word (:mod:`cola.llm.objective`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import cola.distributed as cd
from cola.errors import ConfigError
from cola.io import markdown_table
from cola.llm.objective import (CandidateScores, candidate_scores, default_max_length, encode_examples, evaluate,
                                metrics)
from cola.llm.parallel import as_forward, is_sharded
from cola.llm.tasks import data
from cola.llm.tasks.kind import Inputs, TaskKind, checked_steps
from cola.llm.tasks.tables import finish_markdown, pm
from cola.llm.tasks.templates import BUILTIN_TASKS, Task, get_task, make_task

log = logging.getLogger(__name__)


def build_task(settings: Any) -> Task:
    """The task of ``settings``: a built-in one, or ``custom`` from the template and answers."""
    if settings.task == "custom":
        return make_task(settings.template, settings.answers, name="custom",
                         label_field=settings.label_field or "label")
    task = get_task(settings.task)
    if settings.label_field and settings.label_field != task.label_field:
        task = replace(task, label_field=settings.label_field)
    return task


def load_data(settings: Any, task: Task, seed: int) -> data.Splits:
    """The splits of ``seed``: MeZO's protocol over the task's source or the given files."""
    if settings.train_file:
        train_pool = data.read_rows(Path(settings.train_file))
        data.check_rows(task, train_pool, settings.train_file)
        if settings.test_file:
            test_pool = data.read_rows(Path(settings.test_file))
            data.check_rows(task, test_pool, settings.test_file)
            return data.split_mezo(train_pool, test_pool, settings.n_train, settings.n_val, settings.n_test,
                                   seed, settings.test_seed)
        return data.split_single_pool(train_pool, settings.n_train, settings.n_val, settings.n_test, seed,
                                      settings.test_seed)
    return data.load_splits(task, settings.data_dir, settings.n_train, settings.n_val, settings.n_test, seed,
                            settings.test_seed)


@dataclass
class Evaluator:
    """Scores examples of ``task`` the way ``settings`` asks (batch size, rule, max length)."""

    settings: Any
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


class ClassificationKind(TaskKind):
    """Every ``--task`` that is not another kind's name: a built-in task or ``custom``."""

    name = "classification"
    primary_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm")
    #: quick CPU budget of the embedded default (``cola train`` with no arguments); the paper's protocol (MeZO
    #: splits, 5 epochs) for every other model
    embedded_profile = {"n_train": 240, "n_val": 64, "n_test": 200, "steps": 60, "max_length": 96}
    paper_profile = {"n_train": 1000, "n_val": 500, "n_test": 1000, "epochs": 5.0, "max_length": None}

    def known(self, name: str) -> bool:
        return name == "custom" or name in BUILTIN_TASKS

    def problems(self, v: Any) -> list[str]:
        p = []
        for name, given in (("reference_file", v.reference_file is not None),
                            ("more_references", bool(v.more_references))):
            if given:
                p.append(f"{name} is for --task corpus and --task facts (the texts their forgetting is measured on)")
        if v.replay_file is not None:
            p.append("replay_file is for --task corpus and --task facts (text mixed into their batches to keep)")
        if v.train_paraphrases:
            p.append("train_paraphrases is for --task facts (the phrasings of its facts)")
        if v.task == "custom":
            if not v.template:
                p.append("task 'custom' needs --template, e.g. '{text} It was {answer}'")
            if not v.answers or len(v.answers) < 2:
                p.append("task 'custom' needs --answers with at least two answer words, e.g. terrible,great")
            if not (v.train_file or v.data_dir):
                p.append("task 'custom' needs --train-file (or --data-dir)")
        else:   # an unknown name is the registry's to report (cola.llm.tasks.kinds)
            for name in ("template", "answers"):
                if getattr(v, name) is not None:
                    p.append(f"{name} is for --task custom (task {v.task!r} has its own prompt and answers)")
        if v.test_file and not v.train_file:
            p.append("test_file needs train_file")
        if v.train_file and v.data_dir:
            p.append("give train_file or data_dir, not both")
        for name in ("train_file", "test_file"):
            value = getattr(v, name)
            if value and not Path(value).is_file():
                p.append(f"{name}={value!r}: no such file")
        if v.data_dir and not Path(v.data_dir).exists():
            p.append(f"data_dir={v.data_dir!r}: no such folder or file")
        return p

    def inputs(self, settings: Any, model, tokenizer) -> Inputs:
        max_length = settings.max_length if settings.max_length is not None else default_max_length(model, tokenizer)
        task = build_task(settings)
        splits = {seed: load_data(settings, task, seed) for seed in settings.seeds}
        encoded = {seed: encode_examples(tokenizer, splits[seed].train, task, max_length) for seed in settings.seeds}
        return Inputs(task, splits, encoded, max_length, checked_steps(settings, len(splits[settings.seeds[0]].train)))

    def evaluator(self, settings: Any, tokenizer, inputs: Inputs, progress: bool, start: Any) -> Evaluator:
        return Evaluator(settings, inputs.task, inputs.max_length, progress)

    def markdown(self, results: dict[str, Any]) -> str:
        settings, plan = results["settings"], results["plan"]
        zero = results["zero_shot"]["test"]
        rule = settings["eval_rule"]
        has_f1 = "macro_f1" in zero
        lines = [f"### {plan['task']} on {settings['model']}: test accuracy (rule {rule}, n={zero['n']}), "
                 f"{plan['total_steps']} steps of {plan['examples_per_step']} examples, "
                 f"seeds {', '.join(map(str, settings['seeds']))}", ""]
        header = ["method", "links", "ranks", "trainable", "validation acc after each link", f"test acc ({rule})"]
        if has_f1:
            header.append("macro-F1")
        header += ["acc_mean", "acc_sum", "acc_norm", "train s/run"]
        table = []
        row = ["zero-shot", "–", "–", "0", "–", f"{zero['accuracy']:.3f}"]
        if has_f1:
            row.append(f"{zero['macro_f1']:.3f}")
        row += [f"{zero['acc_mean']:.3f}", f"{zero['acc_sum']:.3f}", f"{zero['acc_norm']:.3f}", "–"]
        table.append(row)
        for method, entry in results.get("summary", {}).items():
            p = plan["methods"][method]
            ranks = "/".join(map(str, p["ranks"])) if p["ranks"] else "all"
            curve = " → ".join(f"{c['mean']:.3f}" for c in entry["validation_curve"]) or "–"
            row = [method, str(p["links"]), ranks, f"{entry['trainable_params']:,}", curve,
                   pm(entry.get("test_accuracy"))]
            if has_f1:
                row.append(pm(entry.get("test_macro_f1")))
            row += [pm(entry.get("test_acc_mean")), pm(entry.get("test_acc_sum")), pm(entry.get("test_acc_norm")),
                    f"{entry['train_seconds']['mean']:.0f}"]
            table.append(row)
        lines += [markdown_table(header, table), ""]
        return finish_markdown(results, lines)

    def headline(self, results: dict[str, Any]) -> str:
        zero = results["zero_shot"]["test"]
        rule = results["settings"]["eval_rule"]
        parts = [f"zero-shot {zero['accuracy']:.3f}"]
        for method, entry in results.get("summary", {}).items():
            parts.append(f"{method} {pm(entry.get('test_accuracy'))}")
        return f"{results['plan']['task']} test accuracy (rule {rule}, n={zero['n']}): " + " | ".join(parts)

    def task_line(self, plan: dict[str, Any], sizes: dict[str, int]) -> str:
        return (f"task {plan['task']} (answers {', '.join(plan['answers'])}): {sizes['train']} train / "
                f"{sizes['validation']} validation / {sizes['test']} test; {plan['tokens_per_example']:.1f} tokens "
                f"per training example on average (max_length {plan['max_length']})")


KIND = ClassificationKind()
