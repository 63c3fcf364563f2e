"""What a strategy is: the small protocols plugins implement, and the facts the chain hands them.

A strategy is any object with the one method of its kind; a factory registered by a plugin is
called ``factory(config, **options)`` and returns one. Strategies that keep state between
steps (e.g. ``plateau``) may add ``state_dict()`` / ``load_state_dict(state)``, which the
chain saves and restores with its own state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

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
class PrepareInfo:
    """What a re-init strategy's optional ``prepare`` gets at a knot, before the per-layer re-inits."""

    link: int                 #: index of the link being started
    generator: torch.Generator  #: the chain's own CPU generator
    closure: Callable[[], Any] | None  #: re-evaluates the model on the knot's batch (see Chain.step), or None


@dataclass
class KnotReport:
    """What happened at one knot (handed to ``cola_after_merge`` hooks, kept in ``Chain.history``)."""

    link: int                         #: index of the link that was merged (0-based)
    step: int                         #: optimizer steps taken when the knot was tied
    norms: dict[str, float]           #: per layer: Frobenius norm of the folded update
    seconds: float                    #: wall time of the whole knot
    new_rank: int                     #: rank of the new link (the largest over layers)
    forced: bool = False              #: tied by ``Chain.tie_knot()`` rather than the merge policy
    grad_norm: float | None = None    #: with diagnostics: norm of the LoRA gradients at the knot
    #: with diagnostics, per layer (see :mod:`cola.diagnostics`): effective rank and Frobenius norm of the
    #: accumulated update (every link folded so far), and the overlap of the newest link with the span of
    #: the previous ones (0: new directions, 1: inside their span; None for the first link)
    effective_rank: dict[str, float] | None = field(default=None)
    accumulated_norm: dict[str, float] | None = field(default=None)
    overlap: dict[str, float | None] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        """Start a new link on ``layer`` (``layer.set_factors_``) without changing its function.

        A strategy may also have ``prepare(layers, ranks, info: PrepareInfo)``, called once at a knot
        before the per-layer ``reinit`` calls, with every LoRA layer and the rank each gets: what a
        strategy needs from all layers at once (e.g. a gradient from one backward pass) goes there.
        """


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
