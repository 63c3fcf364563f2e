"""Fine-tuning causal language models with COLA: the layer under ``cola train`` and ``cola sweep``.

Imports flow one way, floor by floor (no cycles, no import up a floor: checked by tests/test_architecture.py):

1. the basics: :mod:`~cola.llm.models` (OPT / Llama / ..., the embedded SmolLM2-135M),
   :mod:`~cola.llm.divergence` (the KL to the start), :mod:`~cola.llm.parallel` (torch.distributed),
   :mod:`~cola.llm.performance`, :mod:`~cola.llm.tracking`, :mod:`~cola.llm.stats`, :mod:`~cola.llm.lock`,
   :mod:`~cola.llm.stopping`, :mod:`~cola.llm.config_files`, :mod:`~cola.llm.metrics`;
2. the tasks: :mod:`cola.llm.tasks` (each kind of task behind one interface: classification, corpus, facts;
   their data, sources, references and replay) and :mod:`~cola.llm.objective` (their losses and scoring);
3. one experiment: :mod:`~cola.llm.settings` (:class:`TrainSettings`) and :mod:`~cola.llm.validation`,
   :mod:`~cola.llm.plan` (knots, ranks, parameters, FLOPs), :mod:`~cola.llm.host` (a pristine model per run),
   :mod:`~cola.llm.loop` (steps, knots, checkpoints), :mod:`~cola.llm.evaluation` (zero-shot),
   :mod:`~cola.llm.records`, :mod:`~cola.llm.artifacts`, :mod:`~cola.llm.experiment`
   (:func:`run_experiment`: seeds x methods), :mod:`~cola.llm.report` and :mod:`~cola.llm.report_plots`;
4. sweeps: :mod:`cola.llm.sweep` (grids, tuning under a forgetting budget, paired verdicts; the recipes in
   ``cola/llm/recipes``);
5. command line: :mod:`~cola.llm.cli` (``cola train``), :mod:`cola.llm.sweep.cli` (``cola sweep``).

Importing this package does not import transformers or datasets.
"""

from cola.llm.tasks.data import Splits, load_splits
from cola.llm.experiment import run_experiment
from cola.llm.models import EMBEDDED_MODEL, load_model
from cola.llm.objective import EncodedExample, encode_examples, evaluate, training_loss
from cola.llm.settings import TrainSettings
from cola.llm.tasks.templates import DEFAULT_TASK, DataError, Task, get_task, make_task, task_names

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
