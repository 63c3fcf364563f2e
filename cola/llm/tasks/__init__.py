"""What ``cola train`` fine-tunes on: the kinds of task (classification, raw text, facts) behind one interface,
their data and sources, the texts a run keeps (references, replay), and how each is scored and reported.

Importing this package gives the task definitions (:mod:`.templates`); the kinds are in :mod:`.kinds`.
"""

from cola.llm.tasks.templates import (BUILTIN_TASKS, DEFAULT_TASK, DataError, Example, Task, get_task, make_task,
                                      split_template, task_names, template_fields)

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "DataError", "Example", "Task", "get_task", "make_task",
           "split_template", "task_names", "template_fields"]
