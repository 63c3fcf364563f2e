"""LR policies: the learning-rate multiplier around knots, on top of the config's base schedule."""

from __future__ import annotations

import cola

from ._options import positive_int


class Continue:
    """The base schedule runs over all T steps, ignoring knots."""

    def __init__(self, config):
        pass

    def multiplier(self, info) -> float:
        return info.schedule(info.taken, info.total_steps)


class Restart:
    """The base schedule (warm-up included) starts again for each link, over that link's length."""

    def __init__(self, config):
        pass

    def multiplier(self, info) -> float:
        return info.schedule(info.taken - info.link_start, max(1, info.link_end - info.link_start))


class Rewarm:
    """ReLoRA's jagged schedule: LR drops to 0 at a knot and re-warms linearly over ``steps`` steps."""

    def __init__(self, config, steps=50):
        self.steps = positive_int("steps", steps)

    def multiplier(self, info) -> float:
        base = info.schedule(info.taken, info.total_steps)
        if info.link == 0:
            return base
        return base * min(1.0, (info.taken - info.link_start + 1) / self.steps)


@cola.hookimpl
def cola_register_lr_policies(register):
    register("continue", Continue)
    register("restart", Restart)
    register("rewarm", Rewarm)
