"""What every kind of task gives ``cola train``: one small interface, one module per kind.

A kind (:class:`TaskKind`) says what its settings need (:meth:`~TaskKind.problems`), fills their automatic
defaults (:meth:`~TaskKind.profile`), builds a run's inputs (:meth:`~TaskKind.inputs`: the task, each seed's
splits, the encoded training examples, T), their sizes for the plan's FLOPs (:meth:`~TaskKind.sizes`), the
evaluator that scores them (:meth:`~TaskKind.evaluator`) and its report's columns (:meth:`~TaskKind.markdown`,
:meth:`~TaskKind.headline`, :attr:`~TaskKind.metrics`). The kinds are named in :mod:`cola.llm.tasks.kinds`:
the classification tasks (:mod:`~cola.llm.tasks.classification`), raw text (:mod:`~cola.llm.tasks.corpus`),
knowledge injection (:mod:`~cola.llm.tasks.facts`); a fourth is one more module and one more name there.

The settings are passed as they are (a :class:`cola.llm.TrainSettings`): this floor does not import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cola.errors import ConfigError


@dataclass
class Inputs:
    """What every run of an experiment shares: the task, each seed's splits and encoded training set, the
    max length, T, and (the corpus and facts tasks) the texts kept: references and replay pool."""

    task: Any
    splits: dict[int, Any]
    encoded: dict[int, list]
    max_length: int | None
    total_steps: int
    kept: Any = None   #: :class:`cola.llm.tasks.references.ForgettingTexts` or None


@dataclass(frozen=True)
class TextTask:
    """A corpus or facts task as the plan and the report see it: its name, no answer words, where its text came
    from (``info``)."""

    name: str
    info: dict
    answers: tuple = ()


@dataclass(frozen=True)
class ExampleSize:
    """Mean tokens per example through the body, and positions through the LM head."""

    train_tokens: float
    train_positions: float
    eval_tokens: float
    eval_positions: float


def example_sizes(encoded: list, loss: str) -> ExampleSize:
    """Mean tokens and LM-head positions per example, in training and in evaluation.

    Single-token answers: one forward of the context scores every candidate; otherwise one
    sequence per candidate (training with ``lm`` loss: the gold answer only).
    """
    if not encoded:
        return ExampleSize(0.0, 0.0, 0.0, 0.0)
    if all(len(c) == 1 for e in encoded for c in e.candidates):
        t = float(np.mean([len(e.context) for e in encoded]))
        return ExampleSize(t, 1.0, t, 1.0)
    ev_tokens = float(np.mean([sum(len(e.context) + len(c) for c in e.candidates) for e in encoded]))
    ev_pos = float(np.mean([sum(len(c) for c in e.candidates) for e in encoded]))
    if loss == "lm":
        tr_tokens = float(np.mean([len(e.context) + len(e.candidates[e.label]) for e in encoded]))
        tr_pos = float(np.mean([len(e.candidates[e.label]) for e in encoded]))
        return ExampleSize(tr_tokens, tr_pos, ev_tokens, ev_pos)
    return ExampleSize(ev_tokens, ev_pos, ev_tokens, ev_pos)


def checked_steps(settings: Any, n_train: int) -> int:
    """T for ``n_train`` examples; ``end_at_step`` must lie inside it."""
    total = settings.total_steps(n_train)
    if settings.end_at_step is not None and settings.end_at_step > total:
        raise ConfigError(f"end_at_step={settings.end_at_step}: after the last step of the run ({total})")
    return total


class TaskKind:
    """A kind of task. Subclasses set the attributes and implement the methods that raise here."""

    #: the ``--task`` name (the classification kind answers for every other name)
    name: str = ""
    #: a few words on what it trains on (the unknown-task message lists them)
    description: str = ""
    #: a step's loss: ``blocks`` (LM loss on token blocks), ``lm`` (answer tokens' NLL), or None (``--loss``)
    objective: str | None = None
    #: the automatic defaults (n_train, n_val, n_test, max_length, steps or epochs) on the embedded model and
    #: on the paper's models
    embedded_profile: dict[str, Any] = {}
    paper_profile: dict[str, Any] = {}
    #: what a comparison of its runs is about, and the test metrics a sweep may compare
    primary_metric: str = ""
    metrics: tuple[str, ...] = ()
    #: whether its runs keep texts (references, replay) and measure forgetting and the KL to the start
    keeps: bool = False

    def profile(self, embedded: bool) -> dict[str, Any]:
        return self.embedded_profile if embedded else self.paper_profile

    def problems(self, v: Any) -> list[str]:
        """What is wrong with the task's own settings (``v``: the field values), every problem at once."""
        raise NotImplementedError

    def inputs(self, settings: Any, model, tokenizer) -> Inputs:
        raise NotImplementedError

    def sizes(self, settings: Any, inputs: Inputs) -> ExampleSize:
        return example_sizes(inputs.encoded[settings.seeds[0]], settings.objective)

    def evaluator(self, settings: Any, tokenizer, inputs: Inputs, progress: bool, start: Any) -> Callable:
        """``evaluate(model, tokenizer, split, what) -> metrics``; ``start`` the starting point of the KL
        (:class:`cola.llm.tasks.references.StartPoint`) when the kind keeps texts."""
        raise NotImplementedError

    def markdown(self, results: dict[str, Any]) -> str:
        """The results table of ``cola train`` (and the comparison) as markdown."""
        raise NotImplementedError

    def headline(self, results: dict[str, Any]) -> str:
        """One line: zero-shot against each method's test score."""
        raise NotImplementedError

    def task_line(self, plan: dict[str, Any], sizes: dict[str, int]) -> str:
        """The dry run's line on the task and its data."""
        raise NotImplementedError
