"""Merge policies: when the chain ties a knot."""

from __future__ import annotations

import math

import cola
from cola import ConfigError

from ._options import fraction, positive_int


class Knots:
    """Knots at explicit steps (``config.knots`` or the ``knots`` option), or at fractions of the
    run (the ``at`` option: ``at=[0.6]`` ties a knot after 60 % of ``total_steps``, rounded), so a
    recipe such as "rank 8 for 3 of 5 epochs, then rank 4" holds for any number of steps."""

    def __init__(self, config, knots=None, at=None):
        T = config.total_steps
        if at is not None:
            if knots is not None:
                raise ConfigError("merge policy 'knots': give knot steps (knots) or fractions (at), not both")
            if not isinstance(at, (list, tuple)) or not at:
                raise ConfigError(f"at={at!r}: expected a non-empty list of fractions in (0, 1), e.g. at=[0.6]")
            fractions = [fraction("at", a, low_open=True, high_open=True) for a in at]
            knots = [int(T * a + 0.5) for a in fractions]
            if any(b <= a for a, b in zip(knots, knots[1:])) or not all(1 <= k < T for k in knots):
                raise ConfigError(f"at={list(at)} gives knot steps {knots} for total_steps={T}: they must be "
                                  f"strictly increasing in [1, {T - 1}] (fewer or wider-spaced fractions, or more steps)")
        knots = list(knots if knots is not None else (config.knots or []))
        if not knots:
            raise ConfigError("merge policy 'knots' needs knot steps: set knots=[...] (steps) or at=[...] "
                              "(fractions of the run) in the config")
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in knots) \
                or any(b <= a for a, b in zip(knots, knots[1:])) or not all(1 <= k <= T for k in knots):
            raise ConfigError(f"knots={knots}: must be strictly increasing integers in [1, total_steps={T}]")
        self.knots = knots
        self._set = set(knots)

    def is_knot(self, info) -> bool:
        return info.step in self._set

    def planned_knots(self) -> list[int]:
        return list(self.knots)


def even(config):
    """``links`` links of (nearly) equal length over ``total_steps``: the paper's setting."""
    T, m = config.total_steps, config.links
    return Knots(config, knots=[int(T * k / m + 0.5) for k in range(1, m)]) if m > 1 else _Never()


class _Never:
    def is_knot(self, info) -> bool:
        return False

    def planned_knots(self) -> list[int]:
        return []


class Every:
    """A knot every ``every`` steps (ReLoRA's restarts), none at the very last step."""

    def __init__(self, config, every=None):
        self.every = positive_int("every", every)
        self.total = config.total_steps

    def is_knot(self, info) -> bool:
        return info.step % self.every == 0 and info.step < self.total

    def planned_knots(self) -> list[int]:
        return list(range(self.every, self.total, self.every))


class Plateau:
    """A knot when the (smoothed) loss has not improved by ``min_delta`` for ``patience`` steps.

    Needs ``chain.step(loss=...)``. ``smoothing`` is the EMA factor of the loss (0 = raw loss);
    ``min_link_steps`` is the shortest link allowed.
    """

    def __init__(self, config, patience=50, min_delta=0.0, smoothing=0.9, min_link_steps=None):
        self.patience = positive_int("patience", patience)
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ConfigError(f"min_delta={min_delta!r}: must be a number >= 0")
        if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ConfigError(f"smoothing={smoothing!r}: must be a number in [0, 1)")
        self.min_delta, self.smoothing = float(min_delta), float(smoothing)
        self.min_link_steps = positive_int("min_link_steps", min_link_steps if min_link_steps is not None else patience)
        self.total = config.total_steps
        self.ema = None
        self.best = math.inf
        self.since_best = 0

    def is_knot(self, info) -> bool:
        if info.loss is None:
            raise ConfigError("merge policy 'plateau' needs the loss: call chain.step(loss=loss)")
        if not math.isfinite(info.loss):   # a skipped step's loss says nothing about a plateau
            return False
        self.ema = info.loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * info.loss
        if self.ema < self.best - self.min_delta:
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        if (self.since_best >= self.patience and info.step - info.last_knot >= self.min_link_steps
                and info.step < self.total):
            self.best, self.since_best = math.inf, 0
            return True
        return False

    def planned_knots(self):
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.best, self.since_best = state["ema"], state["best"], state["since_best"]


@cola.hookimpl
def cola_register_merge_policies(register):
    register("even", even)
    register("knots", Knots)
    register("every", Every)
    register("plateau", Plateau)
