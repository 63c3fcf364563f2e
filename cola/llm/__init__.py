"""Fine-tuning causal language models with COLA: models, tasks, data and objectives.

The layer under the ``cola train`` command:

* :mod:`cola.llm.models`: :func:`load_model` (OPT / Llama, or the embedded SmolLM2-135M);
* :mod:`cola.llm.tasks`: the paper's tasks with MeZO's prompts, :func:`make_task` for your own;
* :mod:`cola.llm.data`: :func:`load_splits` (local files, the embedded tweets, the hub);
* :mod:`cola.llm.objective`: :func:`encode_examples`, :func:`training_loss`, :func:`evaluate`;
* :mod:`cola.llm.experiment`: :func:`run_experiment` (what ``cola train`` runs) with :class:`TrainSettings`;
  one run's loop is :mod:`cola.llm.loop`, its plan and FLOPs :mod:`cola.llm.plan`.

Importing this package does not import transformers or datasets.
"""

from cola.llm.data import Splits, load_splits
from cola.llm.models import EMBEDDED_MODEL, load_model
from cola.llm.objective import EncodedExample, encode_examples, evaluate, training_loss
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings
from cola.llm.tasks import DEFAULT_TASK, DataError, Task, get_task, make_task, task_names

__all__ = [
    "DEFAULT_TASK",
    "EMBEDDED_MODEL",
    "DataError",
    "EncodedExample",
    "Splits",
    "Task",
    "encode_examples",
    "evaluate",
    "get_task",
    "load_model",
    "load_splits",
    "make_task",
    "task_names",
    "training_loss",
    "run_experiment",
    "TrainSettings",
]
