"""``cola sweep``: a grid of ``cola train`` runs, resumable, with paired comparisons to a baseline.

A sweep is a :class:`SweepSpec`: base settings (any ``cola train`` settings, e.g. model, task,
steps), a *grid* (axis -> list of values), the *seeds* and a *baseline*. Each grid cell is the
base settings with one value per axis; it runs once per seed (one ``cola train`` run each, in
``runs/<key>/seed<k>/``), and its score is compared, seed by seed, with the baseline's on the
same seeds and data (:mod:`cola.llm.stats`).

Axes are ``cola train`` setting names (``links``, ``lr``, ``epochs``, ``rank``, ``method``, ...),
``chain.<ChainConfig field>`` (``chain.reinit``, ...), or one option of a strategy
(``chain.rank_schedule_options.later_rank``). Short names: ``rank_schedule``, ``reinit``,
``optimizer_policy``, ``lr_policy``, ``merge_policy``, ``merge_rule``, ``lr_schedule`` and
``later_rank``.

The baseline is a set of overrides applied to each cell: ``{"method": "lora"}`` (the default)
compares every cell with one LoRA run that has the cell's other settings (its LR, its epochs);
``{"links": 1}`` does the same through the links axis. Runs are identified by what they compute:
two cells that train the same model the same way (a one-link chain is plain LoRA, whatever its
LR policy or rank schedule for later links) share one run, so the baseline is usually trained
once per value of the other axes, not once per cell.

Resuming: finished runs (``results.json`` with status complete) are skipped and half-finished
ones continue from their checkpoints; a grid may grow between invocations (new values, more
seeds) as long as the base settings stay the same. Zero-shot scores, which depend only on the
model and data, are computed once per seed and shared between runs.

Results (``results.json``, ``results.csv``, ``results.md`` and plots, see
:mod:`cola.llm.sweep_report`) hold per cell: mean, std and n of the test score; the paired
difference with its confidence interval and verdict; the validation score after every link;
the mean training-loss curve with the knots; and the compute actually spent: trainable
parameters and training FLOPs per link and in all, the FLOPs ratio to the baseline (so "equal
compute" is checked, not assumed) and the wall time.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

import cola
from cola.errors import ColaError, ConfigError, closest
from cola.llm import stats
from cola.llm.settings import (CHAIN_KEYS, FIELD_NAMES, TrainSettings, _checked, default_of, merge,
                               read_config_file)

log = logging.getLogger(__name__)

SWEEP_VERSION = 1

#: short axis names -> their setting path
AXIS_ALIASES = {
    "rank_schedule": "chain.rank_schedule", "reinit": "chain.reinit", "optimizer_policy": "chain.optimizer_policy",
    "lr_policy": "chain.lr_policy", "merge_policy": "chain.merge_policy", "merge_rule": "chain.merge_rule",
    "lr_schedule": "chain.lr_schedule", "warmup_steps": "chain.warmup_steps",
    "later_rank": "chain.rank_schedule_options.later_rank",
}
#: settings a grid may not vary: the sweep owns them, or they do not change the numbers
NOT_AXES = ("seeds", "compare", "output_dir", "name", "resume", "dry_run", "stop_after", "config", "threads",
            "log_every", "plots", "keep_checkpoints", "checkpoint_every", "save_adapter", "save_links",
            "save_merged", "fsdp")
#: what a sweep's runs default to (each run's adapters and plots are rarely wanted; flags win)
SWEEP_DEFAULTS = {"save_adapter": False, "save_links": False, "plots": False}
#: settings that do not change what a run computes (left out of its identity)
_NOT_IDENTITY = ("seeds", "compare", "output_dir", "name", "resume", "dry_run", "stop_after", "config",
                 "threads", "log_every", "plots", "keep_checkpoints", "checkpoint_every", "save_adapter",
                 "save_links", "save_merged", "fsdp")
#: chain fields that only matter at a knot (dropped from a one-link run's identity)
_KNOT_ONLY = ("links", "knots", "merge_policy", "merge_policy_options", "merge_rule", "merge_rule_options",
              "optimizer_policy", "optimizer_policy_options", "lr_policy", "lr_policy_options", "rank_schedule",
              "rank_schedule_options")
#: settings the zero-shot scores depend on
_ZERO_SHOT_KEYS = ("model", "task", "data_dir", "train_file", "test_file", "template", "answers", "label_field",
                   "n_train", "n_val", "n_test", "test_seed", "max_length", "dtype", "eval_rule", "eval_batch_size",
                   "eval_links", "loss")
#: test metrics a sweep can compare on (``results["runs"][i]["test"][metric]``)
METRICS = ("accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm")


# ============================================================================ the spec

@dataclass
class SweepSpec:
    """What a sweep runs. ``settings`` is a ``cola train`` settings table (as in a config file)."""

    settings: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    name: str | None = None
    description: str | None = None
    metric: str = "accuracy"
    ci: str = "t"
    confidence: float = 0.95

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.settings, dict):
            return [f"settings: expected a table of cola train settings, got {type(self.settings).__name__}"]
        try:
            self.settings = _checked(self.settings, "sweep settings")
        except ConfigError as err:
            p += err.problems
        for key in self.settings:
            if key in ("seeds", "compare"):
                p.append(f"settings.{key}: a sweep sets this itself (seeds: the sweep's `seeds`; compare: "
                         "the `baseline`)")
        if not isinstance(self.grid, dict):
            p.append(f"grid: expected a table of axis = [values], got {type(self.grid).__name__}")
        else:
            grid = {}
            for axis, values in self.grid.items():
                try:
                    path = axis_path(axis)
                except ConfigError as err:
                    p += err.problems
                    continue
                if not isinstance(values, list) or not values:
                    p.append(f"grid.{axis}={values!r}: expected a non-empty list of values")
                    continue
                if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                    p.append(f"grid.{axis}={values!r}: a value is listed twice")
                if path in grid:
                    p.append(f"grid: axis {axis!r} is given twice (as {path})")
                grid[path] = list(values)
            if not p:
                self.grid = grid
        if (not isinstance(self.seeds, list) or not self.seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)):
            p.append(f"seeds={self.seeds!r}: expected a non-empty list of integers")
        elif len(set(self.seeds)) != len(self.seeds):
            p.append(f"seeds={self.seeds}: a seed is listed twice")
        if not isinstance(self.baseline, dict) or not self.baseline:
            p.append(f"baseline={self.baseline!r}: expected overrides such as {{method = \"lora\"}} or {{links = 1}}")
        else:
            base = {}
            for axis, value in self.baseline.items():
                try:
                    base[axis_path(axis)] = value
                except ConfigError as err:
                    p += err.problems
            if not p:
                self.baseline = base
        if self.metric not in METRICS:
            p.append(f"metric={self.metric!r}: allowed {', '.join(METRICS)}")
        try:
            stats.check_ci(self.ci, self.confidence)
        except ConfigError as err:
            p += err.problems
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sweep") -> "SweepSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table, got {type(data).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        data.pop("version", None)
        known = {f for f in cls.__dataclass_fields__}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError([f"{source}: unknown key {k!r} (closest: {', '.join(closest(k, known))})"
                               for k in unknown])
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError([f"{source}: {p}" for p in err.problems]) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "SweepSpec":
        """A TOML or YAML sweep file: ``name``, ``description``, ``seeds``, ``metric``, ``ci``,
        ``confidence``, and the tables ``[settings]`` (with ``[settings.chain]``), ``[grid]`` and
        ``[baseline]``."""
        return cls.from_dict(read_config_file(path), str(path))


def axis_path(axis: str) -> str:
    """The setting path of ``axis`` (short names resolved); a :class:`ConfigError` if it is not one."""
    if not isinstance(axis, str) or not axis:
        raise ConfigError(f"axis {axis!r}: expected a setting name such as lr, links or chain.reinit")
    name = axis.replace("-", "_")
    name = AXIS_ALIASES.get(name, name)
    parts = name.split(".")
    head = parts[0]
    allowed = sorted(set(FIELD_NAMES) - set(NOT_AXES) - {"chain"}) + sorted(AXIS_ALIASES)
    if head in NOT_AXES:
        raise ConfigError(f"axis {axis!r}: the sweep sets {head} itself; it cannot be a grid axis")
    if head not in FIELD_NAMES:
        raise ConfigError(f"axis {axis!r}: not a cola train setting (closest: {', '.join(closest(head, allowed))})")
    if head != "chain":
        if len(parts) > 1:
            raise ConfigError(f"axis {axis!r}: {head} has no parts")
        return name
    if len(parts) < 2 or parts[1] not in CHAIN_KEYS:
        sub = parts[1] if len(parts) > 1 else ""
        raise ConfigError(f"axis {axis!r}: expected chain.<field> with a cola.ChainConfig field "
                          f"(closest: {', '.join(closest(sub, CHAIN_KEYS))})")
    if len(parts) > 2 and not (parts[1].endswith("_options") and len(parts) == 3):
        raise ConfigError(f"axis {axis!r}: only a strategy's options table has parts "
                          "(chain.<kind>_options.<option>)")
    return name


def set_path(settings: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    if parts[0] != "chain":
        settings[path] = value
        return
    chain = dict(settings.get("chain") or {})
    if len(parts) == 2:
        chain[parts[1]] = value
    else:
        options = dict(chain.get(parts[1]) or {})
        options[parts[2]] = value
        chain[parts[1]] = options
    settings["chain"] = chain


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _short(path: str) -> str:
    reverse = {v: k for k, v in AXIS_ALIASES.items()}
    return reverse.get(path, path.rsplit(".", 1)[-1] if path.startswith("chain.") and path.count(".") == 2 else path)


def label_of(values: dict[str, Any]) -> str:
    """``links=3 lr=0.001``: a cell's axis values, short names."""
    return " ".join(f"{_short(k)}={_format_value(v)}" for k, v in values.items()) or "(base settings)"


# ============================================================================ cells and runs

@dataclass
class Cell:
    """One grid cell: its axis ``values``, ``label``, the settings it runs and the run's ``key``."""

    values: dict[str, Any]
    label: str
    settings: TrainSettings
    key: str
    baseline_key: str | None = None
    baseline_label: str | None = None
    is_baseline_only: bool = False


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last axis varies fastest)."""
    axes = list(spec.grid)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(spec.grid[a] for a in axes))]


def cell_settings(spec: SweepSpec, values: dict[str, Any]) -> TrainSettings:
    """The :class:`TrainSettings` of the cell with axis ``values`` (all seeds)."""
    merged = merge(dict(SWEEP_DEFAULTS), copy.deepcopy(spec.settings))
    for path, value in values.items():
        set_path(merged, path, copy.deepcopy(value))
    merged["seeds"] = list(spec.seeds)
    return TrainSettings(**merged)


def effective(settings: TrainSettings) -> TrainSettings:
    """``settings`` reduced to what the run computes, so that equal runs get equal keys.

    A one-link run (``lora``, or ``cola`` whose merge policy plans no knot) is LoRA: the
    knot-only chain settings are dropped and the rank schedule's rank for link 0 becomes the
    rank. Full fine-tuning ignores every LoRA and chain setting.
    """
    s = settings.resolved()
    if s.method == "full":
        return s.replace(chain={}, links=default_of("links"), rank=default_of("rank"), alpha=default_of("alpha"),
                         targets=default_of("targets"), dropout=default_of("dropout"), lr=default_of("lr"))
    s = s.replace(full_lr=default_of("full_lr"))
    total = s.total_steps(s.n_train)
    config = s.chain_config(s.method, total, 0)
    pm = cola.get_plugin_manager()
    policy = pm.create("merge_policy", config.merge_policy, config, config.options("merge_policy"))
    planned = getattr(policy, "planned_knots", None)
    knots = planned() if planned is not None else None
    if knots is None or knots:  # a chain with knots (or knots decided while training)
        return s
    schedule = pm.create("rank_schedule", config.rank_schedule, config, config.options("rank_schedule"))
    rank0 = schedule.rank(0, s.rank)
    chain = {k: v for k, v in s.chain.items() if k not in _KNOT_ONLY}
    return s.replace(method="lora", links=default_of("links"), rank=rank0, chain=chain)


def run_key(settings: TrainSettings) -> str:
    """A short hash of what :func:`effective` ``settings`` compute.

    Settings at their default are left out, so that a setting added in a later version (at a
    default that keeps the old behaviour) does not change the keys of finished runs.
    """
    data = {k: v for k, v in effective(settings).to_dict().items()
            if k not in _NOT_IDENTITY and v != default_of(k)}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_cells(spec: SweepSpec) -> tuple[list[Cell], list[Cell]]:
    """The grid's cells and the baseline runs they need that are not cells themselves.

    Every problem of every cell (bad values, impossible rank schedules, ...) is reported at once.
    """
    cells: list[Cell] = []
    problems: list[str] = []
    for values in expand(spec):
        label = label_of(values)
        resolved = _resolve(spec, values, f"cell {label}", problems)
        if resolved:
            cells.append(Cell(values, label, *resolved))
    if problems:
        raise ConfigError(problems)
    by_key = {c.key: c for c in cells}
    extra: dict[str, Cell] = {}
    for cell in cells:
        values = {**cell.values, **spec.baseline}
        resolved = _resolve(spec, values, f"baseline of cell {cell.label}", problems)
        if not resolved:
            continue
        settings, key = resolved
        cell.baseline_key = key
        if key in by_key:
            cell.baseline_label = by_key[key].label
        else:
            label = "baseline " + label_of({k: v for k, v in values.items()
                                            if k in spec.baseline or _matters(k, settings)})
            if key not in extra:
                extra[key] = Cell(values, label, settings, key, is_baseline_only=True)
            cell.baseline_label = extra[key].label
    if problems:
        raise ConfigError(problems)
    return cells, list(extra.values())


def _resolve(spec: SweepSpec, values: dict[str, Any], what: str, problems: list[str]):
    """``(settings, run key)`` of the cell with ``values``, or None with its problems added."""
    try:
        settings = cell_settings(spec, values)
        return settings, run_key(settings)
    except ConfigError as err:
        problems += [f"{what}: {p}" for p in err.problems]
        return None


def _matters(path: str, settings: TrainSettings) -> bool:
    """Whether axis ``path`` still changes a baseline run (e.g. not ``links`` for LoRA)."""
    if settings.method == "full":
        return path not in ("lr", "links", "rank", "alpha", "dropout", "targets") and not path.startswith("chain.")
    if effective(settings).method == "lora":
        return path != "links" and not any(path.startswith(f"chain.{k}") for k in _KNOT_ONLY)
    return True


# ============================================================================ running

class _ModelCache:
    """Hands every run the same base model object (runs restore it afterwards), reloaded only when
    a run changed it (full fine-tuning, a failure) or asks for another model, dtype or device."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model = None
        self.tokenizer = None

    def loader(self, settings: TrainSettings) -> Callable[[], tuple[Any, Any]]:
        key = (settings.model, settings.dtype, settings.device)

        def load():
            if self.key != key or self.model is None or not self._pristine():
                from cola.llm.models import load_model

                self.model = self.tokenizer = None
                self.model, self.tokenizer = load_model(settings.model, settings.dtype, settings.device)
                self.key = key
            return self.model, self.tokenizer

        return load

    def _pristine(self) -> bool:
        return not cola.lora_layers(self.model) and not any(p.requires_grad for p in self.model.parameters())

    def after(self, settings: TrainSettings, ok: bool) -> None:
        if settings.method == "full" or not ok:
            self.model = self.tokenizer = None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    from cola.llm import runner

    path.parent.mkdir(parents=True, exist_ok=True)
    runner._write_json(path, obj)


def _zero_shot_key(settings: TrainSettings) -> str:
    s = settings.resolved().to_dict()
    data = {k: s[k] for k in _ZERO_SHOT_KEYS}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _share_zero_shot(out: Path, settings: TrainSettings, seed: int, run_dir: Path, direction: str) -> None:
    """Copy the shared zero-shot scores into a new run's folder (``in``) or collect a run's (``out``)."""
    shared_path = out / "zero_shot" / f"{_zero_shot_key(settings)}.json"
    shared = _read_json(shared_path) or {"test": None, "validation": {}}
    local_path = run_dir / "zero_shot.json"
    if direction == "in":
        if shared["test"] is None or local_path.is_file():
            return
        local = {"test": shared["test"], "validation": {}}
        if str(seed) in shared["validation"]:
            local["validation"][str(seed)] = shared["validation"][str(seed)]
        _write_json(local_path, local)
        return
    local = _read_json(local_path)
    if not local:
        return
    changed = shared["test"] is None and local.get("test") is not None
    if changed:
        shared["test"] = local["test"]
    for s, v in (local.get("validation") or {}).items():
        if s not in shared["validation"]:
            shared["validation"][s] = v
            changed = True
    if changed:
        _write_json(shared_path, shared)


def run_status(run_dir: Path) -> str:
    """``complete``, ``partial`` (started: resumable) or ``new``."""
    results = _read_json(run_dir / "results.json")
    if results and results.get("status") == "complete" and results.get("runs"):
        return "complete"
    return "partial" if (run_dir / "settings.json").is_file() else "new"


def run_sweep(spec: SweepSpec, out: str | Path, resume: bool = False, loader: Callable[[], Any] | None = None,
              progress: bool = False, max_runs: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run (or continue) the sweep ``spec`` in folder ``out`` and return its results.

    Args:
        spec: the sweep.
        out: its folder: ``sweep.json`` (the spec), ``runs/<key>/seed<k>/`` (one ``cola train``
            run each), ``zero_shot/``, and the results files.
        resume: continue the sweep in ``out`` (required when ``out`` already holds one); the grid
            and seeds may differ from the saved ones (grown or shrunk), the base settings may not.
        loader: ``loader() -> (model, tokenizer)``, a fresh base model per call (tests); default:
            the settings' model, loaded once and reused between runs.
        progress: progress bars (the CLI); else log lines.
        max_runs: run at most this many (cell, seed) runs in this invocation, then write the
            results so far (``status: "partial"``); for time-sliced jobs and tests.
        dry_run: plan only: every cell's run key, knots, ranks, trainable parameters and FLOPs.

    Returns:
        The results dict (see :mod:`cola.llm.sweep_report`).
    """
    from cola.llm import sweep_report
    from cola.llm.runner import run_experiment

    started = time.time()
    out = Path(out)
    cells, extra = build_cells(spec)
    if dry_run:
        return _plan(spec, cells, extra, out)
    units = _units(spec, cells, extra)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("cola sweep runs in one process; under torchrun/accelerate launch each run would be "
                          "repeated by every rank. Run the sweep without a launcher (data-parallel sweeps are not "
                          "supported yet), or launch cola train per cell")
    _prepare(spec, out, resume)
    cache = _ModelCache()
    done_now, failures = 0, []
    status = "complete"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="sweep", unit="run", dynamic_ncols=True, position=0)
    try:
        for i, (cell, seed) in enumerate(units, 1):
            run_dir = out / "runs" / cell.key / f"seed{seed}"
            state = run_status(run_dir)
            if state == "complete":
                if bar is not None:
                    bar.update(1)
                continue
            if max_runs is not None and done_now >= max_runs:
                status = "partial"
                break
            log.info("sweep run %d/%d: %s, seed %d (%s)", i, len(units), cell.label, seed,
                     "resuming" if state == "partial" else "new")
            settings = effective(cell.settings).replace(seeds=[seed], output_dir=str(run_dir),
                                                        resume=state == "partial")
            _share_zero_shot(out, settings, seed, run_dir, "in")
            ok = False
            try:
                results = run_experiment(settings, loader=loader or cache.loader(settings), progress=progress)
                ok = results.get("status") == "complete"
                if not ok:
                    status = "partial"
            except ColaError as err:
                log.error("sweep run %s seed %d failed: %s", cell.label, seed, err)
                failures.append({"label": cell.label, "key": cell.key, "seed": seed, "error": str(err)})
            finally:
                cache.after(settings, ok)
                _share_zero_shot(out, settings, seed, run_dir, "out")
            done_now += 1
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        log.warning("sweep interrupted; continue with: cola sweep --resume %s", out)
        _finish(spec, out, cells, extra, started, "partial", failures)
        raise
    finally:
        if bar is not None:
            bar.close()
    if failures:
        status = "partial"
    results = _finish(spec, out, cells, extra, started, status, failures)
    sweep_report.log_summary(results)
    return results


def _units(spec: SweepSpec, cells: list[Cell], extra: list[Cell]) -> list[tuple[Cell, int]]:
    """(cell, seed) runs in order: seed by seed (so a cut-short sweep has whole seeds), baselines
    first, each run once even when several cells share it."""
    units, seen = [], set()
    for seed in spec.seeds:
        for cell in [*extra, *cells]:
            if (cell.key, seed) not in seen:
                seen.add((cell.key, seed))
                units.append((cell, seed))
    return units


def _prepare(spec: SweepSpec, out: Path, resume: bool) -> None:
    saved_path = out / "sweep.json"
    saved = _read_json(saved_path)
    if saved is not None and not resume:
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue (or grow) it, or another "
                          "--output-dir")
    if saved is None and resume:
        raise ConfigError(f"resume: {out} holds no sweep (no sweep.json)")
    if saved is not None:
        old = SweepSpec.from_dict(saved.get("spec", {}), str(saved_path))
        if old.settings != spec.settings:
            keys = sorted(set(old.settings) | set(spec.settings))
            diff = [f"{k} (saved {old.settings.get(k)!r}, now {spec.settings.get(k)!r})" for k in keys
                    if old.settings.get(k) != spec.settings.get(k)]
            raise ConfigError([f"resume: the base settings differ from the sweep in {out}:"] + diff)
        if old.grid != spec.grid or old.seeds != spec.seeds or old.baseline != spec.baseline:
            log.info("resume: the grid, seeds or baseline changed; finished runs are reused where they match")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(saved_path, {"version": SWEEP_VERSION, "cola_version": cola.__version__, "spec": spec.to_dict(),
                             "updated": datetime.now().isoformat(timespec="seconds")})


def _plan(spec: SweepSpec, cells: list[Cell], extra: list[Cell], out: Path) -> dict[str, Any]:
    """The dry run: per cell its run key, knots, ranks, trainable parameters and FLOPs."""
    from cola.llm.runner import run_experiment

    plans: dict[str, Any] = {}
    rows = []
    for cell in [*extra, *cells]:
        if cell.key not in plans:
            s = effective(cell.settings).replace(seeds=[spec.seeds[0]], dry_run=True)
            plan = run_experiment(s)["plan"]
            plans[cell.key] = {"total_steps": plan["total_steps"], **plan["methods"][s.method]}
        p = plans[cell.key]
        rows.append({"label": cell.label, "key": cell.key, "baseline": cell.baseline_label,
                     "is_baseline_only": cell.is_baseline_only, "method": p["method"], "links": p["links"],
                     "knots": p["knots"], "ranks": p["ranks"], "steps": p["total_steps"],
                     "trainable_params_per_link": p["trainable_params"], "train_flops_per_link": p["train_flops"],
                     "train_flops": sum(p["train_flops"]) if p["train_flops"] else None})
    base_flops = {r["key"]: r["train_flops"] for r in rows}
    for cell, row in zip([*extra, *cells], rows):
        b = base_flops.get(cell.baseline_key) if cell.baseline_key else None
        row["flops_ratio"] = row["train_flops"] / b if row["train_flops"] and b else None
    runs = len({(c.key, s) for c in [*extra, *cells] for s in spec.seeds})
    return {"dry_run": True, "spec": spec.to_dict(), "output_dir": str(out), "cells": rows, "runs": runs}


# ============================================================================ results

def _seed_records(out: Path, key: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """``{seed: (record, plan, settings)}`` of the complete runs of ``key``."""
    found = {}
    for seed in seeds:
        results = _read_json(out / "runs" / key / f"seed{seed}" / "results.json")
        if not results or results.get("status") != "complete" or not results.get("runs"):
            continue
        record = results["runs"][0]
        found[seed] = {"record": record, "plan": results["plan"]["methods"][record["method"]],
                       "total_steps": results["plan"]["total_steps"], "settings": results["settings"]}
    return found


def summarize_cell(cell: Cell, found: dict[int, dict[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """Mean/std/n of the score, the per-link validation curve, the loss curve, and compute."""
    metric = spec.metric
    seeds = sorted(found)
    scores = {s: float(found[s]["record"]["test"][metric]) for s in seeds}
    entry: dict[str, Any] = {
        "label": cell.label, "values": cell.values, "key": cell.key, "is_baseline_only": cell.is_baseline_only,
        "baseline": cell.baseline_label, "baseline_key": cell.baseline_key, "seeds": seeds, "scores": scores,
        "score": stats.describe(list(scores.values())),
    }
    low, high = stats.mean_interval(list(scores.values()), spec.confidence, "t") if len(scores) > 1 else (None, None)
    entry["score"]["ci"] = [low, high]
    if not seeds:
        return entry
    first = found[seeds[0]]
    record, plan = first["record"], first["plan"]
    entry.update(method=record["method"], links=len(record.get("knots") or []) + 1, knots=record.get("knots") or [],
                 ranks=record.get("ranks") or [], steps=first["total_steps"], lr=record.get("lr"))
    curves = [found[s]["record"].get("curve") or [] for s in seeds]
    n_points = min(len(c) for c in curves)
    entry["validation_per_link"] = [
        {"after_link": curves[0][i]["after_link"], "step": curves[0][i]["step"],
         **stats.describe([c[i]["validation"][metric] for c in curves])} for i in range(n_points)]
    losses = [found[s]["record"]["train_loss"] for s in seeds if found[s]["record"].get("train_loss")]
    if losses:
        n = min(len(x) for x in losses)
        entry["train_loss_mean"] = [float(v) for v in np.mean([x[:n] for x in losses], axis=0)]
        entry["final_train_loss"] = stats.describe([float(np.mean(x[-10:])) for x in losses])
    per_link = plan.get("train_flops")
    entry["compute"] = {
        "trainable_params_per_link": plan.get("trainable_params"),
        "trainable_params_max": max(plan["trainable_params"]) if plan.get("trainable_params") else None,
        "train_flops_per_link": per_link, "train_flops": sum(per_link) if per_link else None,
        "eval_flops": plan.get("eval_flops"),
        "train_seconds": stats.describe([found[s]["record"]["seconds"]["train"] for s in seeds]),
        "wall_seconds": stats.describe([found[s]["record"]["seconds"].get("total", 0.0) for s in seeds]),
    }
    return entry


def aggregate(spec: SweepSpec, out: Path, cells: list[Cell], extra: list[Cell]) -> list[dict[str, Any]]:
    """One summary per cell and baseline run, each cell with its paired comparison."""
    entries = {}
    for cell in [*extra, *cells]:
        entries.setdefault(id(cell), summarize_cell(cell, _seed_records(out, cell.key, spec.seeds), spec))
    by_key = {}
    for cell in [*extra, *cells]:
        by_key.setdefault(cell.key, entries[id(cell)])
    rows = []
    for cell in [*extra, *cells]:
        entry = entries[id(cell)]
        base = by_key.get(cell.baseline_key) if cell.baseline_key else None
        if cell.is_baseline_only or base is None or cell.baseline_key == cell.key:
            entry["comparison"] = None
        else:
            comp = stats.paired_difference(entry["scores"], base["scores"], spec.confidence, spec.ci)
            mine = (entry.get("compute") or {}).get("train_flops")
            theirs = (base.get("compute") or {}).get("train_flops")
            comp["flops_ratio"] = mine / theirs if mine and theirs else None
            comp["equal_compute"] = abs(comp["flops_ratio"] - 1.0) <= 0.01 if comp["flops_ratio"] else None
            comp["baseline"] = cell.baseline_label
            entry["comparison"] = comp
        rows.append(entry)
    return rows


def _finish(spec: SweepSpec, out: Path, cells: list[Cell], extra: list[Cell], started: float, status: str,
            failures: list[dict[str, Any]]) -> dict[str, Any]:
    from cola.llm import sweep_report
    from cola.llm.runner import versions

    rows = aggregate(spec, out, cells, extra)
    expected = len({(c.key, s) for c in [*extra, *cells] for s in spec.seeds})
    finished = sum(1 for key in {c.key for c in [*extra, *cells]} for s in spec.seeds
                   if run_status(out / "runs" / key / f"seed{s}") == "complete")
    if finished < expected:
        status = "partial"
    results = {
        "version": SWEEP_VERSION, "cola_version": cola.__version__, "versions": versions(), "status": status,
        "output_dir": str(out), "spec": spec.to_dict(), "runs_finished": finished, "runs_expected": expected,
        "failures": failures, "seconds_this_invocation": time.time() - started,
        "finished": datetime.now().isoformat(timespec="seconds"), "cells": rows,
    }
    results["files"] = sweep_report.write_all(results, out)
    return results


# ============================================================================ recipes

RECIPE_PACKAGE = "cola.llm.recipes"


def recipe_names() -> list[str]:
    """The shipped recipes (``cola/llm/recipes/*.toml``), by name."""
    return sorted(p.name[:-5] for p in resources.files(RECIPE_PACKAGE).iterdir() if p.name.endswith(".toml"))


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's file, or ``name_or_path`` itself when it is a file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = recipe_names()
    if name_or_path not in names:
        raise ConfigError(f"recipe {name_or_path!r}: no such file and not a shipped recipe (shipped: "
                          f"{', '.join(names)}; closest: {', '.join(closest(name_or_path, names))})")
    return Path(str(resources.files(RECIPE_PACKAGE) / f"{name_or_path}.toml"))


def load_recipe(name_or_path: str) -> SweepSpec:
    """The :class:`SweepSpec` of a shipped recipe name or a sweep file."""
    return SweepSpec.from_file(recipe_path(name_or_path))
