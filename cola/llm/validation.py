"""The value checks of :class:`cola.llm.TrainSettings`: every problem of a run's settings, at once.

The settings class checks each field's type against its annotation; what is checked here is
what a type cannot say: allowed names (with the closest one suggested), ranges, fields that
exclude or need each other, the task's own needs, and the chain table (unknown keys, the
:class:`cola.ChainConfig` it makes, strategy names known to the plugin manager).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from cola.config import STRATEGY_KINDS, ChainConfig
from cola.errors import ConfigError, closest
from cola.llm.corpus_sources import EMBEDDED_CORPORA, EMBEDDED_PREFIX, embedded_name_problem
from cola.llm.facts_sources import SYNTHETIC_PREFIX, parse_synthetic
from cola.llm.tasks import BUILTIN_TASKS
from cola.llm.tracking import TRACKERS, tracker_problems
from cola.manager import get_plugin_manager

METHODS = ("lora", "cola", "full")
"""``lora``: one link; ``cola``: ``links`` links over the same steps; ``full``: every weight trained."""

LOSSES = ("classification", "lm")
RULES = ("mean", "sum", "norm")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
REPLAY_LOSSES = ("lm", "kl")
"""The replay loss: the replayed tokens' NLL, or the KL divergence from the starting model's distributions."""

#: [chain] keys the run sets itself (from steps/epochs, seeds and method/links)
CHAIN_DERIVED = ("total_steps", "seed")
CHAIN_KEYS = tuple(f.name for f in fields(ChainConfig) if f.name not in CHAIN_DERIVED)

#: ChainConfig defaults of this command that differ from ChainConfig's own
CHAIN_DEFAULTS = {"lr_schedule": "linear", "diagnostics": True}

CORPUS = "corpus"
"""The task name of language modelling on raw text (:mod:`cola.llm.corpus`)."""
FACTS = "facts"
"""The task name of knowledge injection (:mod:`cola.llm.facts`)."""


def value_problems(v: Any) -> list[str]:
    """Value checks of settings whose types are right (``v``: the field values)."""
    p: list[str] = []

    def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            p.append(f"{name}={value!r}: allowed {', '.join(allowed)} (closest: {closest(value, allowed)[0]})")

    choice("method", v.method, METHODS)
    if v.compare is not None:
        for m in v.compare:
            choice("compare", m, METHODS)
        if len(set(v.compare)) < 2:
            p.append(f"compare={','.join(v.compare)}: give at least two different methods, e.g. lora,cola")
    choice("loss", v.loss, LOSSES)
    choice("replay_loss", v.replay_loss, REPLAY_LOSSES)
    choice("eval_rule", v.eval_rule, RULES)
    if v.dtype is not None:
        choice("dtype", v.dtype, DTYPE_NAMES)
    for name in v.report_to:
        choice("report_to", name, TRACKERS)
    p += tracker_problems(v.report_to)
    for name, low in (("links", 1), ("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_batch_size", 1),
                      ("max_nonfinite_in_row", 1), ("log_every", 1), ("checkpoint_every", 0), ("n_train", 1),
                      ("n_val", 0), ("n_test", 1), ("steps", 1), ("threads", 1), ("stop_after", 1),
                      ("max_length", 8), ("replay_blocks", 1), ("kl_top_k", 1), ("train_paraphrases", 0),
                      ("eval_every", 0), ("end_at_step", 1)):
        value = getattr(v, name)
        if value is not None and value < low:
            p.append(f"{name}={value}: must be >= {low}")
    for name in ("alpha", "lr", "full_lr", "replay_ratio", "replay_weight"):
        value = getattr(v, name)
        if not (value > 0 and math.isfinite(value)):
            p.append(f"{name}={value}: must be a finite number > 0")
    if not 0 <= v.dropout < 1:
        p.append(f"dropout={v.dropout}: must be in [0, 1)")
    if not (v.weight_decay >= 0 and math.isfinite(v.weight_decay)):
        p.append(f"weight_decay={v.weight_decay}: must be a finite number >= 0")
    if v.epochs is not None and not (v.epochs > 0 and math.isfinite(v.epochs)):
        p.append(f"epochs={v.epochs}: must be a number > 0")
    if v.end_at_step is not None and v.steps is not None and v.end_at_step > v.steps:
        p.append(f"end_at_step={v.end_at_step}: after the last step (steps={v.steps})")
    if v.steps is not None and v.epochs is not None:
        p.append(f"steps={v.steps} and epochs={v.epochs}: give one of them, not both")
    if not v.seeds:
        p.append("seeds: give at least one seed")
    elif len(set(v.seeds)) != len(v.seeds):
        p.append(f"seeds={v.seeds}: repeated seeds")
    if v.n_val == 0 and v.eval_links:
        p.append("n_val=0 with eval_links: evaluating after every link needs validation examples "
                 "(or pass --no-eval-links)")
    if v.fsdp and "full" in (v.compare or [v.method]):
        p.append("fsdp with method 'full': cola train shards LoRA runs only (the LoRA factors stay replicated); "
                 "drop --fsdp, or drop 'full' from --method/--compare")
    if v.targets is not None and not v.targets:
        p.append("targets: give at least one module name pattern")
    p += _task_problems(v)
    p += _chain_problems(v)
    return p


def _corpus_problems(v: Any) -> list[str]:
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
    return p + _reference_problems(v)


def _text_problem(name: str, value: str | None) -> list[str]:
    """What is wrong with a text source (a file or folder, or embedded:NAME), if anything."""
    if value and value.startswith(EMBEDDED_PREFIX):
        problem = embedded_name_problem(value)
        return [f"{name}={problem}"] if problem else []
    if value is not None and not value:
        return [f"{name}: give a file, a folder or embedded:NAME"]
    if value and not Path(value).exists():
        return [f"{name}={value!r}: no such file or folder (or embedded:NAME, one of "
                f"{', '.join(EMBEDDED_CORPORA)})"]
    return []


def _reference_problems(v: Any) -> list[str]:
    """The texts of forgetting and replay (the corpus and facts tasks)."""
    p = _text_problem("reference_file", v.reference_file) + _text_problem("replay_file", v.replay_file)
    for value in v.more_references:
        p += _text_problem("more_references", value)
    return p


def _facts_problems(v: Any) -> list[str]:
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
    return p + _reference_problems(v)


def _task_problems(v: Any) -> list[str]:
    if v.task == CORPUS:
        return _corpus_problems(v)
    if v.task == FACTS:
        return _facts_problems(v)
    p = []
    for name, given in (("reference_file", v.reference_file is not None), ("more_references", bool(v.more_references))):
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
    else:
        if v.task not in BUILTIN_TASKS:
            known = [*BUILTIN_TASKS, CORPUS, FACTS]
            p.append(f"task={v.task!r}: unknown; closest: {', '.join(closest(v.task, known))}; "
                     f"known: {', '.join(BUILTIN_TASKS)}, {CORPUS} (raw text), {FACTS} (knowledge injection), or "
                     "'custom' with --template and --answers")
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

def _chain_problems(v: Any) -> list[str]:
    p = []
    unknown = [k for k in v.chain if k not in CHAIN_KEYS]
    for k in unknown:
        if k in CHAIN_DERIVED:
            p.append(f"chain.{k}: set by the run ({'steps/epochs' if k == 'total_steps' else 'seeds'}); "
                     "remove it from the chain table")
        else:
            p.append(f"unknown chain setting {k!r} (closest: {', '.join(closest(str(k), CHAIN_KEYS))})")
    if unknown:
        return p
    try:  # types and values of the chain fields, with a placeholder T
        ChainConfig(total_steps=max(10**9, v.links), seed=0,
                    **{**CHAIN_DEFAULTS, "links": v.links, **v.chain})
    except ConfigError as err:
        p += [f"chain: {x}" for x in err.problems]
    except TypeError as err:
        p.append(f"chain: {err}")
    pm = get_plugin_manager()
    for kind in STRATEGY_KINDS:
        name = v.chain.get(kind)
        if isinstance(name, str) and name:
            try:
                pm.lookup(kind, name)
            except ConfigError as err:
                p += err.problems
    return p


# ------------------------------------------------------------------ config files and checks
