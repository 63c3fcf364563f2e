"""The task and the data of a run's settings: which task, which examples, in which order.

The data order of a run depends only on its seed and the epoch (:func:`epoch_batches`), so the
data position of a resumed run is the number of micro-batches it consumed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cola.llm import data
from cola.llm.objective import iterate_batches
from cola.llm.settings import TrainSettings
from cola.llm.tasks import Task, get_task, make_task


def build_task(settings: TrainSettings) -> Task:
    """The task of ``settings``: a built-in one, or ``custom`` from the template and answers."""
    if settings.task == "custom":
        return make_task(settings.template, settings.answers, name="custom",
                         label_field=settings.label_field or "label")
    task = get_task(settings.task)
    if settings.label_field and settings.label_field != task.label_field:
        task = replace(task, label_field=settings.label_field)
    return task


def load_data(settings: TrainSettings, task: Task, seed: int) -> data.Splits:
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


def epoch_batches(encoded: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """The micro-batches of ``epoch``: a permutation drawn from ``(seed, epoch)`` alone."""
    state = int(np.random.SeedSequence([seed, 0x5EED, epoch]).generate_state(1)[0])
    return iterate_batches(encoded, batch_size, torch.Generator().manual_seed(state))
