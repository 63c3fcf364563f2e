"""Rank schedules: the rank of each new link."""

from __future__ import annotations

import cola
from cola import ConfigError

from ._options import positive_int


class Constant:
    """Every link has ``rank`` (default: the rank the layers were injected with)."""

    def __init__(self, config, rank=None):
        self.fixed = None if rank is None else positive_int("rank", rank)

    def rank(self, link: int, base_rank: int) -> int:
        return self.fixed or base_rank


class RankList:
    """Explicit ranks per link; links past the end of the list keep its last rank."""

    def __init__(self, config, ranks=None):
        if not isinstance(ranks, (list, tuple)) or not ranks:
            raise ConfigError(f"rank schedule 'list' needs ranks=[r1, r2, ...], got {ranks!r}")
        self.ranks = [positive_int(f"ranks[{i}]", r) for i, r in enumerate(ranks)]

    def rank(self, link: int, base_rank: int) -> int:
        return self.ranks[min(link, len(self.ranks) - 1)]


class StepDown:
    """The paper's ablation: ``first_rank`` (default: base rank) for link 0, ``later_rank`` after."""

    def __init__(self, config, later_rank=None, first_rank=None):
        self.later = positive_int("later_rank", later_rank)
        self.first = None if first_rank is None else positive_int("first_rank", first_rank)

    def rank(self, link: int, base_rank: int) -> int:
        return (self.first or base_rank) if link == 0 else self.later


class Geometric:
    """``round(base * factor**link)``, kept in [min_rank, max_rank]."""

    def __init__(self, config, factor=0.5, min_rank=1, max_rank=None):
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise ConfigError(f"factor={factor!r}: must be a number > 0")
        self.factor = float(factor)
        self.min_rank = positive_int("min_rank", min_rank)
        self.max_rank = None if max_rank is None else positive_int("max_rank", max_rank)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ConfigError(f"max_rank={max_rank} < min_rank={min_rank}")

    def rank(self, link: int, base_rank: int) -> int:
        r = max(self.min_rank, int(round(base_rank * self.factor ** link)))
        return min(r, self.max_rank) if self.max_rank is not None else r


@cola.hookimpl
def cola_register_rank_schedules(register):
    register("constant", Constant)
    register("list", RankList)
    register("step-down", StepDown)
    register("geometric", Geometric)
