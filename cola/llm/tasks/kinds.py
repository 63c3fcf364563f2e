"""The kinds of task by name: ``--task corpus``, ``--task facts``, and every other name a classification task
(built in, or ``custom``). A new kind is one module with a :class:`~cola.llm.tasks.kind.TaskKind` and its name here.
"""

from __future__ import annotations

from typing import Any

from cola.errors import closest
from cola.llm.tasks import classification, corpus, facts
from cola.llm.tasks.kind import TaskKind
from cola.llm.tasks.templates import BUILTIN_TASKS

#: the kinds chosen by their own ``--task`` name (any other name is a classification task)
KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (corpus.KIND, facts.KIND)}
CLASSIFICATION = classification.KIND


def kind_of(task: str | None) -> TaskKind:
    """The kind of ``--task task``."""
    return KINDS.get(task or "", CLASSIFICATION)


def task_problems(v: Any) -> list[str]:
    """An unknown task name, or what the kind of ``v.task`` finds wrong with its settings."""
    if v.task not in KINDS and not CLASSIFICATION.known(v.task):
        known = [*BUILTIN_TASKS, *KINDS]
        others = ", ".join(f"{name} ({kind.description})" for name, kind in KINDS.items())
        return [f"task={v.task!r}: unknown; closest: {', '.join(closest(v.task, known))}; known: "
                f"{', '.join(BUILTIN_TASKS)}, {others}, or 'custom' with --template and --answers"]
    return kind_of(v.task).problems(v)
