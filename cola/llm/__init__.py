"""Fine-tuning causal language models with COLA: the layer under ``cola train`` and ``cola sweep``.

One job a module; imports flow from the settings up to the command line (no cycles: checked by
tests/test_architecture.py):

* settings: :mod:`~cola.llm.settings` (:class:`TrainSettings`, typed by its annotations),
  :mod:`~cola.llm.validation` (every problem at once), :mod:`~cola.llm.config_files` (TOML/YAML/JSON);
* tasks and data: :mod:`~cola.llm.tasks` (prompts, answers), :mod:`~cola.llm.data` (examples and
  MeZO splits), :mod:`~cola.llm.corpus_sources` and :mod:`~cola.llm.corpus` (raw text: documents,
  the split by document, packed blocks, perplexity), :mod:`~cola.llm.inputs` (a run's task and data);
* models: :mod:`~cola.llm.models` (OPT / Llama, the embedded SmolLM2-135M), :mod:`~cola.llm.host`
  (a pristine model for each run), :mod:`~cola.llm.performance` (checkpointing, attention, compile);
* objective: :mod:`~cola.llm.objective` (losses and candidate scoring);
* plan: :mod:`~cola.llm.plan` (knots, ranks, trainable parameters and FLOPs, from :func:`cola.plan`);
* one run: :mod:`~cola.llm.loop` (steps, knots, checkpoints), :mod:`~cola.llm.evaluation`,
  :mod:`~cola.llm.records` (the typed :class:`~cola.llm.records.RunRecord`),
  :mod:`~cola.llm.artifacts` (adapters, merged model), :mod:`~cola.llm.parallel` (torch.distributed);
* the experiment: :mod:`~cola.llm.experiment` (:func:`run_experiment`: seeds x methods),
  :mod:`~cola.llm.report` and :mod:`~cola.llm.report_plots` (files and plots), :mod:`~cola.llm.stats`;
* sweeps: :mod:`~cola.llm.sweep_spec`, :mod:`~cola.llm.sweep_cells`, :mod:`~cola.llm.sweep`,
  :mod:`~cola.llm.sweep_results`, :mod:`~cola.llm.sweep_report`, the recipes in ``cola/llm/recipes``;
* command line: :mod:`~cola.llm.cli` (``cola train``), :mod:`~cola.llm.sweep_cli` (``cola sweep``).

Importing this package does not import transformers or datasets.
"""

from cola.llm.data import Splits, load_splits
from cola.llm.experiment import run_experiment
from cola.llm.models import EMBEDDED_MODEL, load_model
from cola.llm.objective import EncodedExample, encode_examples, evaluate, training_loss
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
