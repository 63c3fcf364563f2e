"""The cells of a sweep and the runs they need: what each computes, and the key that names it.

Runs are identified by what they compute: two cells that train the same model the same way (a
one-link chain is plain LoRA, whatever its LR policy or rank schedule for later links) share one
run, so the baseline is usually trained once per value of the other axes, not once per cell.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import MISSING, dataclass, fields
from typing import Any

import cola
from cola.errors import ConfigError
from cola.llm.config_files import merge
from cola.llm.settings import CHAIN_DEFAULTS, CHAIN_DERIVED, TrainSettings, default_of
from cola.llm.sweep.spec import SweepSpec, label_of, set_path

#: what a sweep's runs default to (each run's adapters and plots are rarely wanted; flags win)
SWEEP_DEFAULTS = {"save_adapter": False, "save_links": False, "plots": False}
#: settings that do not change what a run computes (left out of its identity)
_NOT_IDENTITY = ("seeds", "compare", "output_dir", "name", "resume", "dry_run", "stop_after", "config",
                 "threads", "log_every", "plots", "keep_checkpoints", "checkpoint_every", "save_adapter",
                 "save_links", "save_merged", "fsdp", "gradient_checkpointing", "attn_implementation", "compile",
                 "report_to", "take_over_lock")
#: chain fields that only matter at a knot (dropped from a one-link run's identity)
_KNOT_ONLY = ("links", "knots", "merge_policy", "merge_policy_options", "merge_rule", "merge_rule_options",
              "optimizer_policy", "optimizer_policy_options", "lr_policy", "lr_policy_options", "rank_schedule",
              "rank_schedule_options")


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
    tuning: dict[str, Any] | None = None  #: how its tuned values were chosen (:mod:`cola.llm.sweep.tuning`)


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last axis varies fastest), then the extra cells."""
    axes = list(spec.grid)
    grid = [dict(zip(axes, combo)) for combo in itertools.product(*(spec.grid[a] for a in axes))]
    return grid + [dict(cell) for cell in spec.cells if dict(cell) not in grid]


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
    # the number of examples is known only once the data is read (the corpus and facts tasks by default use
    # them all): any count will do to ask whether the chain plans knots at all
    total = s.total_steps(s.n_train if s.n_train is not None else 10**6)
    plan = cola.plan(s.chain_config(s.method, total, 0), s.rank)
    if plan.knots is None or plan.knots:  # a chain with knots (or knots decided while training)
        return s
    chain = {k: v for k, v in s.chain.items() if k not in _KNOT_ONLY}
    return s.replace(method="lora", links=default_of("links"), rank=plan.ranks[0], chain=chain)


#: the version of :func:`run_key` (kept in ``sweep.json``; a resumed sweep of an older one is migrated once)
KEY_VERSION = 2


def _chain_defaults() -> dict[str, Any]:
    """The value every ``chain`` field has when it is left out (``cola train``'s defaults, then ChainConfig's)."""
    found = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
             for f in fields(cola.ChainConfig) if f.name not in CHAIN_DERIVED}
    return {**found, **CHAIN_DEFAULTS}


def identity_chain(settings: TrainSettings) -> dict[str, Any]:
    """``settings.chain`` without the values that equal what leaving them out gives (``reinit = "lora"``,
    ``lr_policy = "continue"``, an empty options table, ...), so that writing a default does not make another
    run. ``links`` is kept unless it equals the run's ``links`` (the chain's wins), ``merge_policy`` when
    ``knots`` are given (they choose the knots policy only when it is left out)."""
    defaults = _chain_defaults()
    kept = {}
    for key, value in settings.chain.items():
        if key == "links":
            same = value == settings.links
        elif key == "merge_policy" and settings.chain.get("knots") is not None:
            same = False
        else:
            same = key in defaults and value == defaults[key]
        if not same:
            kept[key] = value
    return kept


def run_key(settings: TrainSettings) -> str:
    """A short hash of what :func:`effective` ``settings`` compute.

    Settings at their default are left out, so that a setting added in a later version (at a
    default that keeps the old behaviour) does not change the keys of finished runs; so are chain values
    equal to their default (:func:`identity_chain`): a recipe that spells out ``reinit = "lora"`` shares
    the runs of one that does not. (Version 1 kept them: ``sweep.json`` records the version, and
    :func:`cola.llm.sweep.migrate_keys` renames an older sweep's run folders once.)
    """
    s = effective(settings)
    data = {k: v for k, v in s.replace(chain=identity_chain(s)).to_dict().items()
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


