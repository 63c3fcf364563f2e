"""The hooks of chain-of-lora (pluggy project ``"cola"``, entry-point group ``"cola"``).

Registry hooks hand a plugin a ``register(name, factory)`` callable; the plugin calls it once
per strategy it provides. ``factory(config, **options)`` must return an object with the
strategy kind's method (see :mod:`cola.strategies`). Names are global per kind: registering a
name twice is an error naming both plugins.

Notification hooks are called by :class:`cola.Chain` as training proceeds; their return
values are ignored.
"""

from __future__ import annotations

import pluggy

PROJECT = "cola"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cola_register_merge_policies(register):
    """Register merge policies: when to tie a knot.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``is_knot(info: StepInfo) -> bool`` and optionally
        ``planned_knots() -> list[int] | None``.
    """


@hookspec
def cola_register_rank_schedules(register):
    """Register rank schedules: which rank each new link gets.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``rank(link: int, base_rank: int) -> int`` (a rank >= 1; the chain refuses
        ranks above a layer's min(in, out)).
    """


@hookspec
def cola_register_reinit_strategies(register):
    """Register re-init strategies: how a new link's factors are initialised.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``reinit(layer, rank, info: ReinitInfo) -> None`` that calls
        ``layer.set_factors_`` and leaves the layer's function unchanged (a strategy that puts
        weight into A, B must fold the same amount out with ``layer.fold_``).
    """


@hookspec
def cola_register_merge_rules(register):
    """Register merge rules: how a link is folded into the frozen weights.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``factors(layer) -> (B, A, scale)``: the low-rank update the chain folds
        (after checking it is finite for every layer).
    """


@hookspec
def cola_register_optimizer_policies(register):
    """Register optimizer-state policies: what happens to the optimizer state at a knot.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``apply(optimizer, params, info: StepInfo) -> None``. State whose shape
        no longer matches its parameter (a rank change) is dropped by the chain afterwards.
    """


@hookspec
def cola_register_lr_policies(register):
    """Register LR policies: what the learning rate does around knots.

    Called once, when the plugin manager first collects strategies.

    :param register: ``register(name, factory)``; ``factory(config, **options)`` returns an
        object with ``multiplier(info: LRInfo) -> float``, the factor applied to every param
        group's learning rate for the next step.
    """


@hookspec
def cola_after_step(chain, step, loss):
    """Called after every optimizer step of a chain, before the merge policy is asked.

    :param chain: the :class:`cola.Chain`.
    :param step: optimizer steps taken so far (1 after the first).
    :param loss: the loss passed to ``Chain.step`` (a float), or None.
    """


@hookspec
def cola_before_merge(chain, link, step):
    """Called at a knot, before the live link is folded into the weights.

    :param chain: the :class:`cola.Chain`.
    :param link: index of the link about to be merged (0-based).
    :param step: optimizer steps taken so far.
    """


@hookspec
def cola_after_merge(chain, report):
    """Called at a knot after merge, re-init, optimizer policy and LR policy.

    :param chain: the :class:`cola.Chain`.
    :param report: a :class:`cola.KnotReport` (link, step, per-layer norms, seconds, new rank).
    """
