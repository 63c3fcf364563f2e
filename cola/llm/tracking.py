"""Experiment tracking of ``cola train`` (``--report-to``): TensorBoard, trackio or Weights & Biases.

One *run* (one seed of one method) is one tracked run, named ``<name>/<method>-seed<k>`` (``<name>``:
``--name`` or the output folder's name; ``cola sweep``: ``<sweep>/<cell label>``, tuning runs'
labels start with ``tuning``). :func:`open_run` makes its :class:`Tracking`, which turns what the
loop has in hand into flat metrics and hands them to one :class:`Tracker` per backend:

* ``train/loss``, ``train/lr``, ``train/link`` of every step, when the loop reads its pending steps
  back from the device (no extra host read);
* ``knot/*`` at every knot: mean and max over layers of the folded update's norm, seconds, the new
  rank and, with diagnostics, the gradient norm and the layer means of effective rank, accumulated
  norm and overlap;
* ``validation/*`` after every link (zero-shot at step 0 included) and ``test/*`` at the end;
* the run's settings as hyper-parameters.

Nothing leaves the machine unless an online tracker is chosen: TensorBoard writes event files under
the run's folder, trackio writes its local database (unless ``TRACKIO_SPACE_ID`` names a Space), and
wandb is online unless ``WANDB_MODE=offline`` (or ``disabled``), which wandb itself reads.
"""

from __future__ import annotations

import bisect
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cola.diagnostics import knot_metrics
from cola.errors import ConfigError

log = logging.getLogger(__name__)

#: the project name trackio and wandb file runs under (``TRACKIO_PROJECT`` / ``WANDB_PROJECT`` win)
PROJECT = "chain-of-lora"
#: backend -> (the module it imports, the package to pip install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "wandb": ("wandb", "wandb")}
TRACKERS = ("none", *PACKAGES)
"""The values of ``--report-to``: ``none`` (the default) or one or more backends."""


def _missing(name: str) -> str:
    module, package = PACKAGES[name]
    return f"report_to={name}: needs the {module} package, which is not installed: pip install {package}"


def tracker_problems(report_to: list[str]) -> list[str]:
    """What is wrong with the known names of ``report_to`` (unknown ones are the caller's check):
    ``none`` beside a tracker, a repeated tracker, a tracker whose package is not installed."""
    p = []
    if "none" in report_to and len(report_to) > 1:
        p.append(f"report_to={' '.join(report_to)}: 'none' means no tracker; give it alone")
    if len(set(report_to)) < len(report_to):
        p.append(f"report_to={' '.join(report_to)}: a tracker is named twice")
    for name in dict.fromkeys(report_to):
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            p.append(_missing(name))
    return p


def _require(name: str, module: str | None = None):
    """Import backend ``name``'s module (or ``module``); a ConfigError with the pip command if it is missing."""
    try:
        return importlib.import_module(module or PACKAGES[name][0])
    except ImportError as err:
        raise ConfigError(f"{_missing(name)} ({err})") from None


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as one level of ``a.b`` keys with numbers, strings and booleans (lists joined by commas,
    None left out): what TensorBoard's hyper-parameters take."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        elif value is not None:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of ``metrics`` (lists, strings and None left out) as ``<prefix>/<key>`` floats."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ============================================================================ backends

class Tracker(Protocol):
    """One backend's run: made by ``Backend(name, group, folder, config, start_step)``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (tag -> number) at optimizer step ``step``."""

    def close(self, failed: bool = False) -> None:
        """Finish the run (``failed``: it ended with an error)."""


class TensorBoardTracker:
    """Event files in ``folder`` (``torch.utils.tensorboard.SummaryWriter``); the settings as a text and as
    the HParams dashboard's session. A resumed run purges the events past its checkpoint."""

    def __init__(self, name: str, group: str, folder: Path, config: dict[str, Any], start_step: int = 0):
        tensorboard = _require("tensorboard", "torch.utils.tensorboard")
        self.summary = importlib.import_module("torch.utils.tensorboard.summary")
        self.writer = tensorboard.SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("settings", f"```\n{json.dumps(config, indent=1, default=str)}\n```", 0)
        _, session_start, _ = self.summary.hparams(flat(config), {})
        self.writer.file_writer.add_summary(session_start)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool = False) -> None:
        if not failed:  # the session's end (status: success)
            self.writer.file_writer.add_summary(self.summary.hparams({}, {})[2])
        self.writer.close()


class TrackioTracker:
    """A trackio run (local unless ``TRACKIO_SPACE_ID`` names a Space), grouped by the run name's ``<name>``."""

    def __init__(self, name: str, group: str, folder: Path, config: dict[str, Any], start_step: int = 0):
        self.trackio = _require("trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, group=group, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.trackio.finish()


class WandbTracker:
    """A wandb run in group ``<name>``, its files under ``folder``; ``WANDB_MODE=offline`` keeps it local."""

    def __init__(self, name: str, group: str, folder: Path, config: dict[str, Any], start_step: int = 0):
        wandb = _require("wandb")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, group=group,
                              config=config, dir=str(folder))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "trackio": TrackioTracker, "wandb": WandbTracker}


# ============================================================================ one run

@dataclass(frozen=True)
class Naming:
    """How an experiment's runs are tracked: run ``<method>-seed<k>`` is ``<group>/<method>-seed<k>``, its
    local files (TensorBoard's events, wandb's folder) in ``<folder>/<method>-seed<k>``."""

    group: str
    folder: Path


class Tracking:
    """The trackers of one run, fed with what the loop has in hand. With no tracker every call is a no-op."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def steps(self, first: int, losses: list[float | None], lrs: list[float], knot_steps: list[int]) -> None:
        """Steps ``first``, ``first + 1``, ...: loss (None: skipped, not logged), LR and link (the knots
        tied before the step)."""
        for i, (loss, lr) in enumerate(zip(losses, lrs)):
            step = first + i
            metrics = {"train/lr": float(lr), "train/link": float(bisect.bisect_left(knot_steps, step))}
            if loss is not None:
                metrics["train/loss"] = float(loss)
            self.log(metrics, step)

    def knot(self, report) -> None:
        """A :class:`cola.KnotReport`, at its step."""
        self.log(knot_metrics(report), report.step)

    def validation(self, point: dict[str, Any]) -> None:
        """A point of the COLA curve (``{"after_link", "step", "validation"}``), at its step."""
        self.log(scalars(point["validation"], "validation"), point["step"])

    def test(self, metrics: dict[str, Any], step: int) -> None:
        self.log(scalars(metrics, "test"), step)

    def close(self, failed: bool = False) -> None:
        """Close every tracker (each one even when another fails to)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as err:  # a tracker that cannot finish must not hide the run's own outcome
                log.warning("tracker %s did not close: %s", type(tracker).__name__, err)


def open_run(report_to: list[str], naming: Naming, key: str, config: dict[str, Any], start_step: int = 0) -> Tracking:
    """The :class:`Tracking` of run ``key`` (``<method>-seed<k>``) with one tracker per name of ``report_to``;
    ``start_step``: the steps a resumed run has already taken."""
    names = [n for n in dict.fromkeys(report_to) if n != "none"]
    tracking = Tracking()
    try:
        for name in names:
            tracking.trackers.append(BACKENDS[name](f"{naming.group}/{key}", naming.group, naming.folder / key,
                                                    config, start_step))
    except BaseException:
        tracking.close(failed=True)
        raise
    if names:
        log.info("%s: tracked as %s/%s by %s", key, naming.group, key, ", ".join(names))
    return tracking
