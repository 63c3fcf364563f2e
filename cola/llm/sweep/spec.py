"""What a sweep is: :class:`SweepSpec` (base settings, grid, seeds, baseline), its axes and labels,
and the shipped recipes.

Axes are ``cola train`` setting names (``links``, ``lr``, ``epochs``, ``rank``, ``method``, ...),
``chain.<ChainConfig field>`` (``chain.reinit``, ...), or one option of a strategy
(``chain.rank_schedule_options.later_rank``). Short names: ``rank_schedule``, ``reinit``,
``optimizer_policy``, ``lr_policy``, ``merge_policy``, ``merge_rule``, ``lr_schedule`` and
``later_rank``. Running a sweep is :mod:`cola.llm.sweep`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cola.config import Validated
from cola.errors import ConfigError, closest
from cola.llm import stats
from cola.llm.config_files import checked, read_config_file
from cola.llm.records import primary_metric
from cola.llm.tasks.kinds import CLASSIFICATION, kind_of
from cola.llm.settings import CHAIN_KEYS, FIELD_NAMES, FILE_KEYS

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
            "save_merged", "fsdp", "gradient_checkpointing", "attn_implementation", "compile", "report_to",
            "take_over_lock")
#: test metrics a sweep can compare on (``results["runs"][i]["test"][metric]``)
METRICS = ("accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm", "perplexity", "loss", "bits_per_byte",
           "forgetting", "reference_perplexity", "recall", "token_accuracy", "answer_loss", "paraphrase_recall")
"""Test metrics a sweep can compare on; perplexity, loss, bits per byte, answer loss and forgetting are better
when lower (:func:`cola.llm.stats.higher_is_better`)."""



# ============================================================================ the spec

@dataclass
class SweepSpec(Validated):
    """What a sweep runs. ``settings`` is a ``cola train`` settings table (as in a config file)."""

    settings: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    """Cells beyond the grid, each a table of axis values (e.g. ``{method = "full"}``, or LoRA of another
    rank): compared with the baseline like the grid's cells."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    name: str | None = None
    description: str | None = None
    metric: str | None = None
    """The test metric compared; default: the task's own (perplexity for the corpus task, accuracy otherwise)."""
    ci: str = "t"
    confidence: float = 0.95
    tune: dict[str, list[Any]] = field(default_factory=dict)
    """Axes each cell picks its own value of before it is scored (e.g. ``{"lr": [1e-3, 2e-3, 5e-3]}``): on the
    validation split of ``tune_seeds`` (:mod:`cola.llm.sweep.tuning`)."""
    tune_seeds: list[int] = field(default_factory=lambda: [1000])
    """The seeds of the tuning runs: disjoint from ``seeds``, so that the report seeds never see the tuning."""
    max_forgetting: float | None = None
    """A forgetting budget (nats of the reference loss's rise over zero-shot, validation, mean over the tuning
    seeds): each cell picks its best candidate among those within it; a cell with none is reported as such."""
    max_kl: float | None = None
    """A budget on the mean KL divergence from the starting model on the reference (validation), like
    ``max_forgetting``; both may be given."""
    refine: int | None = None
    """Rounds of refinement of the numeric tuned axes: after each round, candidates log-midway between the best
    and its neighbours (one step beyond it at an edge of a list) are added and run. Default 0, or 2 for an
    ``auto:LOW:HIGH`` axis."""
    tune_step: bool = False
    """Also pick the step: every point of a candidate's trajectory (``eval_every``) is a candidate, and the cell
    then ends its report runs at the chosen step (``end_at_step``), as a user picks a checkpoint."""

    tune_bounds: dict[str, list[float]] = field(default_factory=dict)
    """The ``auto:LOW:HIGH`` axes and their bounds (their refinement stays inside them); filled in from them."""

    @property
    def refine_rounds(self) -> int:
        if self.refine is not None:
            return self.refine
        return 2 if self.tune_bounds else 0

    @property
    def budget(self) -> dict[str, float]:
        """``{"forgetting": B, "reference_kl": B'}``: the budgets that are set, by the validation metric they bound."""
        return {k: v for k, v in (("forgetting", self.max_forgetting), ("reference_kl", self.max_kl)) if v is not None}

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.settings, dict):
            return [f"settings: expected a table of cola train settings, got {type(self.settings).__name__}"]
        try:
            self.settings = checked(self.settings, "sweep settings", FILE_KEYS)
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
        p += self._cell_problems()
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
        p += self._metric_problems()
        p += self._tune_problems()
        p += self._budget_problems()
        try:
            stats.check_ci(self.ci, self.confidence)
        except ConfigError as err:
            p += err.problems
        return p

    def _metric_problems(self) -> list[str]:
        """Check ``metric`` against the sweep's tasks (filling in the task's own metric when unset)."""
        tasks = {str(t) for t in self.grid.get("task", [])} if isinstance(self.grid, dict) else set()
        if isinstance(self.settings, dict):
            tasks = tasks or {str(self.settings.get("task"))}
        kinds = {kind_of(t).name for t in tasks}
        if len(kinds) > 1:
            return [f"grid.task={sorted(tasks)}: a sweep compares one kind of task (corpus, facts or classification), "
                    "since the metric it compares is one of them"]
        kind = kinds.pop() if kinds else CLASSIFICATION.name
        if self.metric is None:
            self.metric = primary_metric({"task": next(iter(tasks), None)})
        if self.metric not in METRICS:
            return [f"metric={self.metric!r}: allowed {', '.join(METRICS)}"]
        allowed = kind_of(kind).metrics
        if self.metric not in allowed:
            return [f"metric={self.metric!r}: not a metric of the {kind} task; allowed {', '.join(allowed)}"]
        return []

    def _tune_problems(self) -> list[str]:
        if not isinstance(self.tune, dict):
            return [f"tune: expected a table of axis = [values], got {type(self.tune).__name__}"]
        self.tune = {k: [v] if isinstance(v, str) else v for k, v in self.tune.items()}   # lr = "auto:LOW:HIGH"
        p, tune = [], {}
        varied = set(self.grid) if isinstance(self.grid, dict) else set()
        fixed = set(self.baseline) if isinstance(self.baseline, dict) else set()
        for cell in self.cells if isinstance(self.cells, list) else []:
            fixed |= set(cell) if isinstance(cell, dict) else set()
        for axis, values in self.tune.items():
            try:
                path = axis_path(axis)
            except ConfigError as err:
                p += [f"tune: {x}" for x in err.problems]
                continue
            if not isinstance(values, list) or not values:
                p.append(f"tune.{axis}={values!r}: expected a non-empty list of values")
                continue
            if len(values) == 1 and isinstance(values[0], str) and values[0].startswith(AUTO_PREFIX):
                try:
                    values, bounds = auto_values(values[0])
                except ConfigError as err:
                    p += [f"tune.{axis}: {x}" for x in err.problems]
                    continue
                self.tune_bounds = {**self.tune_bounds, path: list(bounds)}
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                p.append(f"tune.{axis}={values!r}: a value is listed twice")
            if path in varied or path in fixed:
                p.append(f"tune.{axis}: {path} is also set by the grid, a cell or the baseline; a tuned axis is "
                         "chosen per cell, so give it in one place only")
            tune[path] = list(values)
        if not p:
            self.tune = tune
        seeds = self.tune_seeds
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            p.append(f"tune_seeds={seeds!r}: expected a non-empty list of integers")
        elif len(set(seeds)) != len(seeds):
            p.append(f"tune_seeds={seeds}: a seed is listed twice")
        elif isinstance(self.seeds, list) and set(seeds) & set(self.seeds):
            p.append(f"tune_seeds={seeds} share {sorted(set(seeds) & set(self.seeds))} with seeds={self.seeds}: the "
                     "report seeds must never see the tuning; choose other tuning seeds")
        return p

    def _budget_problems(self) -> list[str]:
        p = []
        for name in ("max_forgetting", "max_kl"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                p.append(f"{name}={value!r}: must be a finite number >= 0 (nats)")
                continue
            setattr(self, name, float(value))
            if not self.tune:
                p.append(f"{name}={value}: a budget chooses among tuning candidates: give --tune (e.g. lr=1e-3,3e-3)")
        if self.budget and self.metric in CLASSIFICATION.metrics:
            p.append(f"max_forgetting / max_kl: metric {self.metric!r} is a classification task's, which measures no "
                     "forgetting (the corpus and facts tasks do)")
        if self.refine is not None and (isinstance(self.refine, bool) or not isinstance(self.refine, int)
                                        or not 0 <= self.refine <= 10):
            p.append(f"refine={self.refine!r}: rounds of refinement, an integer in [0, 10]")
        if not isinstance(self.tune_step, bool):
            p.append(f"tune_step={self.tune_step!r}: expected true or false")
        elif self.tune_step:
            every = self.settings.get("eval_every") if isinstance(self.settings, dict) else None
            if not every:
                p.append("tune_step: picking the step needs the candidates' trajectories: set eval_every (e.g. "
                         "--eval-every 20) in the sweep's settings")
            if not self.tune:
                p.append("tune_step: give --tune (the candidates whose steps are picked)")
        return p

    def _cell_problems(self) -> list[str]:
        if not isinstance(self.cells, list) or not all(isinstance(c, dict) and c for c in self.cells):
            return [f"cells={self.cells!r}: expected a list of non-empty tables of axis values"]
        p, cells = [], []
        for i, cell in enumerate(self.cells):
            values = {}
            for axis, value in cell.items():
                try:
                    values[axis_path(axis)] = value
                except ConfigError as err:
                    p += [f"cells[{i}]: {x}" for x in err.problems]
            cells.append(values)
        if not p:
            self.cells = cells
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
        ``confidence``, ``tune_seeds``, and the tables ``[settings]`` (with ``[settings.chain]``),
        ``[grid]``, ``[baseline]``, ``[tune]`` and ``[[cells]]``."""
        return cls.from_dict(read_config_file(path), str(path))


AUTO_PREFIX = "auto:"
#: values of an ``auto:LOW:HIGH`` axis before any refinement
AUTO_POINTS = 4


def round_value(value: float) -> float:
    """``value`` to 3 significant digits (tuned values that read well: 0.00548, not 0.005477225575)."""
    return float(f"{value:.3g}")


def auto_values(text: str) -> tuple[list[float], tuple[float, float]]:
    """The values of ``auto:LOW:HIGH[:N]``: N (default 4) log-spaced values from LOW to HIGH, 3 significant digits."""
    parts = text[len(AUTO_PREFIX):].split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
        n = int(parts[2]) if len(parts) > 2 else AUTO_POINTS
        if len(parts) > 3:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(f"{text!r}: expected auto:LOW:HIGH or auto:LOW:HIGH:N, e.g. auto:1e-4:1e-2") from None
    if not (0 < low < high and math.isfinite(high)) or n < 2:
        raise ConfigError(f"{text!r}: auto:LOW:HIGH[:N] needs 0 < LOW < HIGH and N >= 2 (N log-spaced values from LOW to HIGH)")
    values = [round_value(low * (high / low) ** (i / (n - 1))) for i in range(n)]
    return values, (low, high)


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


def short_name(path: str) -> str:
    reverse = {v: k for k, v in AXIS_ALIASES.items()}
    return reverse.get(path, path.rsplit(".", 1)[-1] if path.startswith("chain.") and path.count(".") == 2 else path)


def label_of(values: dict[str, Any]) -> str:
    """``links=3 lr=0.001``: a cell's axis values, short names."""
    return " ".join(f"{short_name(k)}={_format_value(v)}" for k, v in values.items()) or "(base settings)"



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
