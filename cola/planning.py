"""The chain's plan: where the knots fall and the rank of every link, before anything trains.

:func:`plan` is the one place that turns a :class:`ChainConfig` into knots and ranks. The
:class:`~cola.Chain` checks itself against it, ``cola train --dry-run`` prints it, and
``cola sweep`` uses it to tell a one-link chain (plain LoRA) from a real one.

A merge policy that knows its knots in advance (``even``, ``knots``, ``every``) gives a complete
plan. One that decides while training (``plateau``) gives ``knots=None``; the plan then covers
``config.links`` links, the number the rank schedule is checked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import STRATEGY_KINDS, ChainConfig
from .errors import ConfigError, UnknownStrategyError
from .manager import PluginManager, get_plugin_manager


@dataclass(frozen=True)
class Plan:
    """Knots and ranks of a chain of ``total_steps`` optimizer steps."""

    total_steps: int                       #: T
    knots: tuple[int, ...] | None          #: knot steps, strictly increasing in [1, T]; None: decided while training
    ranks: tuple[int, ...]                 #: rank of each planned link, for the given base rank

    @property
    def links(self) -> int:
        """Number of links: one more than the knots (the planned count when knots are not known)."""
        return len(self.knots) + 1 if self.knots is not None else len(self.ranks)

    @property
    def steps_per_link(self) -> list[int] | None:
        """Optimizer steps of each link (None when the knots are decided while training)."""
        if self.knots is None:
            return None
        bounds = [0, *self.knots, self.total_steps]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def to_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "links": self.links,
                "knots": list(self.knots) if self.knots is not None else None, "ranks": list(self.ranks),
                "steps_per_link": self.steps_per_link}


def build_strategies(config: ChainConfig, plugin_manager: PluginManager | None = None,
                     kinds: tuple[str, ...] = STRATEGY_KINDS) -> dict[str, Any]:
    """One strategy object per kind in ``kinds``, from the plugins; every problem reported at once."""
    pm = plugin_manager or get_plugin_manager()
    strategies, problems, error_type = {}, [], ConfigError
    for kind in kinds:
        try:
            strategies[kind] = pm.create(kind, getattr(config, kind), config, config.options(kind))
        except ConfigError as err:
            problems += err.problems
            if isinstance(err, UnknownStrategyError):
                error_type = UnknownStrategyError
    if problems:
        raise error_type(problems)
    return strategies


def check_rank(rank: Any, max_rank: int | None, schedule: str, link: int, where: str = "") -> int:
    """``rank`` if it is an integer in [1, ``max_rank``], else a :class:`ConfigError` naming both."""
    limit = max_rank if max_rank is not None else "any"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or (max_rank is not None and rank > max_rank):
        raise ConfigError(f"rank schedule {schedule!r} gave rank {rank!r} for link {link}{where}; "
                          f"allowed: integers in [1, {limit}]")
    return rank


def plan(config: ChainConfig, base_rank: int, max_rank: int | None = None,
         plugin_manager: PluginManager | None = None, strategies: dict[str, Any] | None = None) -> Plan:
    """The knots and the rank of every link of a chain with ``config``.

    Args:
        config: the chain's config.
        base_rank: the rank the LoRA layers were injected with (what rank schedules scale).
        max_rank: the largest rank the layers allow (``min(in, out)`` of the smallest layer);
            None skips the upper bound.
        plugin_manager: where the strategies come from (default: the global one).
        strategies: already built ``merge_policy`` and ``rank_schedule`` objects (the chain's own),
            so that stateful strategies are not built twice.

    Raises:
        ConfigError: unknown strategies or bad options, knots that are not strictly increasing
            inside [1, T], or a rank outside [1, ``max_rank``] (every problem at once).
    """
    if strategies is None:
        strategies = build_strategies(config, plugin_manager, ("merge_policy", "rank_schedule"))
    T = config.total_steps
    planned = getattr(strategies["merge_policy"], "planned_knots", None)
    knots = planned() if planned is not None else None
    problems = []
    if knots is not None:
        knots = list(knots)
        if (not all(isinstance(k, int) and not isinstance(k, bool) for k in knots)
                or any(b <= a for a, b in zip(knots, knots[1:])) or not all(1 <= k <= T for k in knots)):
            problems.append(f"merge policy {config.merge_policy!r} plans knots {knots}: they must be strictly "
                            f"increasing integers in [1, total_steps={T}]")
    n_links = len(knots) + 1 if knots is not None else config.links
    schedule = strategies["rank_schedule"]
    ranks = []
    for link in range(n_links):
        try:
            ranks.append(check_rank(schedule.rank(link, base_rank), max_rank, config.rank_schedule, link))
        except ConfigError as err:
            problems += err.problems
            break
    if problems:
        raise ConfigError(problems)
    return Plan(T, tuple(knots) if knots is not None else None, tuple(ranks))
