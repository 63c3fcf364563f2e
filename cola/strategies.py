"""What a strategy is: the small protocols plugins implement, and the facts the chain hands them.

A strategy is any object with the one method of its kind; a factory registered by a plugin is
called ``factory(config, **options)`` and returns one. Strategies that keep state between
steps (e.g. ``plateau``) may add ``state_dict()`` / ``load_state_dict(state)``, which the
chain saves and restores with its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .lora import LoRALinear


@dataclass(frozen=True)
class StepInfo:
    """Where the chain stands after an optimizer step."""

    step: int                 #: optimizer steps taken so far (1 after the first step)
    total_steps: int          #: T
    link: int                 #: 0-based index of the live link
    last_knot: int            #: step of the last knot (0 before the first one)
    loss: float | None        #: the loss passed to ``Chain.step`` (None if not given)


@dataclass(frozen=True)
class ReinitInfo:
    """What a re-init strategy knows about the layer it initialises."""

    name: str                 #: module name of the layer
    link: int                 #: index of the link being started (0 = the first link)
    generator: torch.Generator  #: the chain's own CPU generator: draw from it for reproducibility


@dataclass(frozen=True)
class LRInfo:
    """What an LR policy needs to compute the multiplier of the next step."""

    taken: int                #: optimizer steps already taken
    total_steps: int          #: T
    link: int                 #: live link index
    link_start: int           #: step at which the live link started (0 for the first)
    link_end: int             #: planned end of the live link (next knot, else T)
    schedule: Callable[[int, int], float]  #: base schedule: ``schedule(taken, horizon) -> multiplier``


@runtime_checkable
class MergePolicy(Protocol):
    def is_knot(self, info: StepInfo) -> bool:
        """True when a knot should be tied now (after ``info.step`` steps)."""


@runtime_checkable
class RankSchedule(Protocol):
    def rank(self, link: int, base_rank: int) -> int:
        """The rank of link ``link`` (0-based) given the rank the layers were injected with."""


@runtime_checkable
class ReinitStrategy(Protocol):
    def reinit(self, layer: "LoRALinear", rank: int, info: ReinitInfo) -> None:
        """Start a new link on ``layer`` (``layer.set_factors_``) without changing its function."""


@runtime_checkable
class MergeRule(Protocol):
    def factors(self, layer: "LoRALinear") -> tuple[torch.Tensor, torch.Tensor, float]:
        """The low-rank update ``(B, A, scale)`` to fold into the layer's weight at a knot."""


@runtime_checkable
class OptimizerPolicy(Protocol):
    def apply(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], info: StepInfo) -> None:
        """Act on the optimizer state of the LoRA ``params`` after re-init."""


@runtime_checkable
class LRPolicy(Protocol):
    def multiplier(self, info: LRInfo) -> float:
        """Factor applied to every param group's LR for the next step."""


#: strategy kind -> (protocol, the method a strategy of that kind must have)
PROTOCOLS = {
    "merge_policy": (MergePolicy, "is_knot"),
    "rank_schedule": (RankSchedule, "rank"),
    "reinit": (ReinitStrategy, "reinit"),
    "merge_rule": (MergeRule, "factors"),
    "optimizer_policy": (OptimizerPolicy, "apply"),
    "lr_policy": (LRPolicy, "multiplier"),
}
