"""``ChainConfig``: the typed, validated description of a chain."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError, closest

STRATEGY_KINDS = ("merge_policy", "rank_schedule", "reinit", "merge_rule", "optimizer_policy", "lr_policy")
LR_SCHEDULES = ("constant", "linear", "cosine")
COMPENSATIONS = ("auto", "device", "host")
DEFAULT_LINKS = 3
"""The chain's length when none is given: the paper's longest chain (``cola train`` uses it too)."""


class Validated:
    """A dataclass that checks itself on construction: ``problems()`` lists every problem, and any
    problem is raised at once as one :class:`ConfigError`."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:  # pragma: no cover - every subclass has its own
        return []


@dataclass
class ChainConfig(Validated):
    """How a chain of LoRA links is trained. Validated on construction; all problems reported at once."""

    total_steps: int = field(metadata={"help": "T: optimizer steps of the whole chain"})
    links: int = field(default=DEFAULT_LINKS, metadata={
        "help": "number of links (1 = plain LoRA): the 'even' merge policy splits total_steps into this many; "
                "a policy that plans its own knots ('knots', 'every') ignores it, and for one that decides while "
                "training ('plateau') it is the number of links the rank schedule is checked for"})
    knots: list[int] | None = field(default=None, metadata={
        "help": "explicit knot steps for the 'knots' merge policy (strictly increasing, in [1, T])"})
    merge_policy: str = field(default="even", metadata={"help": "when to tie a knot"})
    rank_schedule: str = field(default="constant", metadata={"help": "the rank of each new link"})
    reinit: str = field(default="lora", metadata={"help": "how a new link is initialised"})
    merge_rule: str = field(default="add", metadata={"help": "how a link is folded into the weights"})
    optimizer_policy: str = field(default="reset", metadata={"help": "what happens to optimizer state at a knot"})
    lr_policy: str = field(default="continue", metadata={"help": "what the learning rate does at a knot"})
    merge_policy_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the merge policy"})
    rank_schedule_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the rank schedule"})
    reinit_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the re-init strategy"})
    merge_rule_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the merge rule"})
    optimizer_policy_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the optimizer policy"})
    lr_policy_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the LR policy"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "base LR multiplier over the steps: constant, linear (decay to 0) or cosine"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the base schedule"})
    seed: int = field(default=0, metadata={"help": "seed of the chain's own generator (re-inits)"})
    record_links: bool = field(default=True, metadata={
        "help": "keep each folded link's factors (small) so the chain can be exported as one adapter"})
    skip_nonfinite: bool = field(default=True, metadata={
        "help": "skip (and count) a step whose loss or LoRA gradients are not finite; decided on the device, "
                "with no host read (the skipped step still counts toward the schedule, as with GradScaler)"})
    compensation: str = field(default="auto", metadata={
        "help": "where a bf16/fp16 base's compensation buffer lives: host (host memory, touched only at knots, "
                "layer by layer: accelerator memory equal to LoRA's), device (beside the weight), or auto (host when "
                "the weights are on an accelerator, device on CPU)"})
    diagnostics: bool = field(default=False, metadata={
        "help": "record at each knot the gradient norm and, per layer, the effective rank and norm of the "
                "accumulated update and the new link's overlap with the previous ones (cola.diagnostics; the "
                "last three need record_links, the default)"})

    def problems(self) -> list[str]:
        """Every problem of this config (empty when valid); strategy names are checked by the chain."""
        p: list[str] = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        T = self.total_steps
        if not is_int(T) or T < 1:
            p.append(f"total_steps={T!r}: must be an integer >= 1")
            T = None
        if not is_int(self.links) or self.links < 1:
            p.append(f"links={self.links!r}: must be an integer >= 1")
        elif T is not None and self.links > T and self.merge_policy == "even":
            p.append(f"links={self.links} > total_steps={T}: every link of the 'even' policy needs at least one "
                     "step (links=1 is a single link, plain LoRA)")
        if self.knots is not None:
            knots = self.knots
            if not isinstance(knots, (list, tuple)) or not all(is_int(k) for k in knots):
                p.append(f"knots={knots!r}: must be a list of integers")
            else:
                if any(b <= a for a, b in zip(knots, knots[1:])):
                    p.append(f"knots={list(knots)}: must be strictly increasing")
                if T is not None and any(not 1 <= k <= T for k in knots):
                    p.append(f"knots={list(knots)}: every knot must lie in [1, total_steps={T}]")
        for kind in STRATEGY_KINDS:
            name = getattr(self, kind)
            if not isinstance(name, str) or not name:
                p.append(f"{kind}={name!r}: must be a strategy name (a non-empty string)")
            opts = getattr(self, kind + "_options")
            if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
                p.append(f"{kind}_options={opts!r}: must be a dict with string keys")
        if self.compensation not in COMPENSATIONS:
            p.append(f"compensation={self.compensation!r}: allowed {', '.join(COMPENSATIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            p.append(f"lr_schedule={self.lr_schedule!r}: allowed {', '.join(LR_SCHEDULES)}"
                     f" (closest: {closest(str(self.lr_schedule), LR_SCHEDULES)[0]})")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            p.append(f"warmup_steps={self.warmup_steps!r}: must be an integer >= 0")
        if not is_int(self.seed):
            p.append(f"seed={self.seed!r}: must be an integer")
        for flag in ("record_links", "diagnostics", "skip_nonfinite"):
            if not isinstance(getattr(self, flag), bool):
                p.append(f"{flag}={getattr(self, flag)!r}: must be true or false")
        return p

    def options(self, kind: str) -> dict[str, Any]:
        return dict(getattr(self, kind + "_options"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChainConfig":
        """Build from a plain mapping (e.g. a TOML/YAML table); unknown keys are errors with suggestions."""
        if not isinstance(data, dict):
            raise ConfigError(f"chain config must be a table of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        problems = [f"unknown setting {k!r} (closest: {', '.join(closest(str(k), known))})" for k in unknown]
        if "total_steps" not in data:
            problems.append("total_steps is required")
        if problems:
            raise ConfigError(problems)
        try:
            return cls(**data)
        except TypeError as err:  # e.g. a list where a dict belongs, caught by dataclass machinery
            raise ConfigError(str(err)) from None


def schedule_multiplier(schedule: str, taken: int, horizon: int, warmup: int = 0) -> float:
    """The base LR multiplier for the step after ``taken`` steps of a ``horizon``-step run.

    constant: 1; linear: decays from 1 to 1/horizon-ish towards 0; cosine: half cosine to 0.
    A linear warm-up over ``warmup`` steps comes first (1/warmup, 2/warmup, ..., 1).
    """
    if taken < warmup:
        return (taken + 1) / warmup
    if schedule == "constant" or horizon <= warmup:
        return 1.0
    progress = min(1.0, max(0.0, (taken - warmup) / (horizon - warmup)))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
