"""A rank schedule that halves the rank at every knot (never below 1)."""

import cola


class Halving:
    def __init__(self, config, floor=1):
        self.floor = floor

    def rank(self, link, base_rank):
        return max(self.floor, base_rank >> link)


@cola.hookimpl
def cola_register_rank_schedules(register):
    register("halving", Halving)
