"""The name ``cola train``'s loop had before the LLM layer was split into modules; kept so that
``from cola.llm.runner import run_experiment`` goes on working. The loop is in
:mod:`cola.llm.experiment` (seeds x methods), :mod:`cola.llm.loop` (one run) and the modules
they import."""

from cola.llm.experiment import run_experiment

__all__ = ["run_experiment"]
