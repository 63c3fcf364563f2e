"""The typed record of one run (one seed of one method): what it is, what it did, what it scored.

A :class:`RunRecord` is saved inside every checkpoint (so a resumed run continues its loss curve
and its evaluations), written as ``runs/<method>-seed<k>/run.json`` when the run completes, and
kept under ``results["runs"]`` in ``results.json`` (as :meth:`RunRecord.to_dict`, the format
``cola sweep`` and the report read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from cola.llm.tasks.facts_scoring import retention
from cola.llm.tasks.kinds import kind_of


def primary_metric(settings: dict[str, Any]) -> str:
    """What a comparison of ``cola train`` runs is about: test perplexity for the corpus task, exact-match
    recall of the facts taught for the facts task, test accuracy (under the run's rule) for the
    classification tasks."""
    return kind_of(settings.get("task")).primary_metric


def losses(values: Sequence[float | None]) -> np.ndarray:
    """A loss curve as floats: a skipped (non-finite) step, recorded as None, becomes NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def mean_loss(values: Sequence[float | None]) -> float | None:
    """The mean of the steps that were taken (None when none was)."""
    x = losses(values)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _seconds() -> dict[str, float]:
    return {"train": 0.0, "eval": 0.0, "export": 0.0}


@dataclass
class RunRecord:
    """Everything a run records. Lists grow as it trains; ``status`` ends as ``complete``."""

    method: str                                  #: lora, cola or full
    seed: int
    total_steps: int                             #: T: optimizer steps of the run
    trainable_params: int                        #: trainable parameters of the live link (or all, full)
    trainable_params_per_link: list[int]         #: of each planned link
    lr: float                                    #: the AdamW LR of the trained parameters
    data: dict[str, int]                         #: split sizes
    chain_config: dict[str, Any] | None = None   #: the chain's config (None for full fine-tuning)
    knots: list[int] | None = field(default_factory=list)  #: planned knots (None: decided while training)
    ranks: list[int] = field(default_factory=list)         #: planned rank of each link
    status: str = "running"                      #: running, complete
    train_loss: list[float | None] = field(default_factory=list)  #: loss of every step (None: skipped)
    lr_per_step: list[float] = field(default_factory=list)  #: LR (after the chain's policy) of each step
    curve: list[dict[str, Any]] = field(default_factory=list)  #: validation after each link (the COLA curve)
    trajectory: list[dict[str, Any]] = field(default_factory=list)  #: validation every eval_every steps
    knot_reports: list[dict[str, Any]] = field(default_factory=list)  #: the chain's KnotReports, as dicts
    seconds: dict[str, float] = field(default_factory=_seconds)  #: train, eval, export (and total)
    position: int = 0                            #: global micro-batches consumed (the data position)
    nonfinite_steps: int = 0                     #: steps skipped for a non-finite loss or gradient
    nonfinite_in_row: int = 0                    #: of them, the current run of consecutive ones
    test: dict[str, Any] | None = None           #: test metrics at the end
    zero_shot: dict[str, Any] | None = None      #: the base model's test and validation metrics
    outputs: dict[str, Any] = field(default_factory=dict)  #: files written (adapters, merged model)
    flops: dict[str, Any] | None = None          #: estimated training FLOPs per link, evaluation FLOPs

    @property
    def steps_taken(self) -> int:
        return len(self.train_loss)

    @property
    def key(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def add_curve_point(self, after_link: int, step: int, validation: dict[str, Any]) -> None:
        """A point of the COLA curve; for the corpus and facts tasks with its forgetting so far (the rise
        of the reference loss over the zero-shot point, the curve's first); for the facts task with what
        the link did to the facts recalled before it (:func:`cola.llm.tasks.facts_scoring.retention`)."""
        if self.curve and "reference_loss" in validation:
            validation = {**validation,
                          "forgetting": validation["reference_loss"] - self.curve[0]["validation"]["reference_loss"]}
        if self.curve and "recalled" in validation and "recalled" in self.curve[-1]["validation"]:
            validation = {**validation, **retention(self.curve[-1]["validation"]["recalled"], validation["recalled"])}
        self.curve.append({"after_link": after_link, "step": step, "validation": validation})

    def add_trajectory_point(self, step: int, link: int, validation: dict[str, Any]) -> None:
        """A point of the run's learn / forget trajectory (``eval_every``): the validation scores at ``step``
        (in link ``link``, 0-based), with the forgetting so far (over the trajectory's first point, zero-shot)."""
        if self.trajectory and "reference_loss" in validation:
            validation = {**validation, "forgetting":
                          validation["reference_loss"] - self.trajectory[0]["validation"]["reference_loss"]}
        validation = {k: v for k, v in validation.items() if k not in ("kept", "lost", "new", "kept_fraction")}
        self.trajectory.append({"step": step, "link": link, "validation": validation})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from :meth:`to_dict` output (keys it does not know are ignored: a newer file)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
