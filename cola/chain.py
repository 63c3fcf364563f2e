"""The chain: a residual, Frank-Wolfe-style optimizer over successive LoRA links.

``Chain`` wraps any torch model with LoRA layers and any torch optimizer. Each ``step()`` it
takes the optimizer step, then asks the merge policy whether to tie a knot. At a knot, in
order: before-merge hooks, merge rule (checked finite for every layer before anything is
written), re-init strategy with the rank from the rank schedule, optimizer-state policy,
LR policy, after-merge hooks with a :class:`KnotReport`. All of the knot logic is here; the
saved state is :mod:`cola.chain_state`, the non-finite guard :mod:`cola.guard`, the knot
diagnostics :mod:`cola.diagnostics`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from . import _dtensor as dt
from . import chain_state, guard
from .config import ChainConfig, schedule_multiplier
from .diagnostics import effective_rank, update_stats
from .errors import ConfigError, NonFiniteMergeError
from .inject import lora_layers
from .lora import LoRALinear, stacked_factors
from .manager import PluginManager, get_plugin_manager
from .peft_models import attach as attach_peft, first_link_layers
from .planning import Plan, build_strategies, check_rank, plan
from .strategies import KnotReport, LRInfo, PrepareInfo, ReinitInfo, StepInfo

__all__ = ["Chain", "KnotReport", "effective_rank"]

log = logging.getLogger(__name__)

_SHARDED_RANK = ("rank schedule {schedule!r} gives {where} rank {rank}, but FSDP shards its LoRA factors (rank {base}), "
                 "whose rank cannot change: keep the factors replicated (cola.distributed.fsdp(model), "
                 "shard_lora=False) to change ranks; nothing was changed")

Closure = Callable[[], Any]
"""``closure()`` re-evaluates the model on the current batch as torch optimizers' closures do: it
zeroes the gradients, computes the loss, calls ``backward()`` (and, data-parallel, averages the
gradients over the ranks) and returns the loss. Re-init strategies that probe the gradient at a
knot (``fw``) call it."""


def _as_float(loss: torch.Tensor | float | None) -> float | None:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach())
    return None if loss is None else float(loss)


class Chain(guard.Guarded):
    """Chain of LoRA: train a link, tie a knot (merge + restart), repeat.

    Args:
        model: any torch model with LoRA layers (see :func:`cola.inject_lora`), or a ``peft.PeftModel``:
            its LoRA layers are converted and its adapter is the first link (see :mod:`cola.peft_models`;
            :func:`cola.to_peft` gives it back as a correct PeftModel when training is over).
        optimizer_factory: ``optimizer_factory(params) -> torch.optim.Optimizer``, called once
            with every LoRA parameter (the same Parameter objects serve every link).
        config: the :class:`ChainConfig`.
        scheduler: optional ``scheduler(optimizer) -> LRScheduler``, stepped after each step;
            the LR policy's multiplier applies on top of it.
        plugin_manager: defaults to :func:`cola.get_plugin_manager`.
    """

    def __init__(self, model: nn.Module, optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 config: ChainConfig, scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 plugin_manager: PluginManager | None = None):
        if not isinstance(config, ChainConfig):
            raise ConfigError(f"config must be a cola.ChainConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self.peft = attach_peft(model, config.record_links)  # a PeftModel's layers become cola layers (or None)
        self.layers: dict[str, LoRALinear] = lora_layers(model)
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no LoRA layers: call cola.inject_lora(model, ...) first")
        self.pm = plugin_manager or get_plugin_manager()
        self.strategies = build_strategies(self.config, self.pm)
        self.base_ranks = {name: layer.rank for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.record_links = config.record_links
            device = dt.local(layer.base.weight).device
            layer.compensation = ("host" if device.type != "cpu" else "device") if config.compensation == "auto" \
                else config.compensation
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0               # optimizer steps of the schedule (a skipped one counts)
        self.link = 0
        self.last_knot = 0
        self.history: list[KnotReport] = []
        self.counts = guard.Counts()      # non-finite steps skipped, on the device until read
        self._check_planned_ranks()
        self.params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        optimizer = optimizer_factory(self.params)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate / Trainer wrappers
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer_factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        self.optimizer = optimizer
        self.link_starts: dict[str, int] = {}  # per layer: where the live link's entries begin in layer.links
        # link 0, initialised by the strategies too, except where PEFT made the factors (its init_lora_weights,
        # or a loaded adapter): those are kept when the rank schedule gives link 0 their rank
        self._start_link(None, keep=first_link_layers(self.layers))
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self._notify_steps = self.pm.has_impls("cola_after_step")
        self._loss_needed = self.planned_knots() is None  # a policy deciding while training reads the loss

    # ------------------------------------------------------------------ the plan
    def plan(self) -> Plan:
        """The chain's :class:`cola.Plan` (knots, rank per link) for the largest base rank of its layers."""
        return plan(self.config, max(self.base_ranks.values()), None, strategies=self.strategies)

    def planned_knots(self) -> list[int] | None:
        """The knots the merge policy will tie, when it knows them in advance."""
        planned = getattr(self.strategies["merge_policy"], "planned_knots", None)
        return planned() if planned is not None else None

    def planned_ranks(self) -> list[int]:
        """The rank (for the layers' base rank) of each planned link."""
        return list(self.plan().ranks)

    def _rank_for(self, name: str, link: int) -> int:
        rank = self.strategies["rank_schedule"].rank(link, self.base_ranks[name])
        rank = check_rank(rank, self.layers[name].max_rank, self.config.rank_schedule, link, f" of {name}")
        if rank != self.base_ranks[name] and dt.is_dtensor(self.layers[name].lora_A):  # before anything is written
            raise ConfigError(_SHARDED_RANK.format(schedule=self.config.rank_schedule, where=f"link {link} of {name}",
                                                   rank=rank, base=self.base_ranks[name]))
        return rank

    def _check_planned_ranks(self) -> None:
        """The plan holds for every layer: each (base rank, largest rank) pair is checked once; a layer whose
        factors FSDP shards keeps its rank in every link."""
        problems: dict[str, str] = {}   # each problem once, with the first layer it was found on
        sharded = {n for n, layer in self.layers.items() if dt.is_dtensor(layer.lora_A)}
        pairs = sorted({(self.base_ranks[n], layer.max_rank, n in sharded) for n, layer in self.layers.items()})
        for base, limit, fixed in pairs:
            where = next(n for n, layer in self.layers.items()
                         if (self.base_ranks[n], layer.max_rank, n in sharded) == (base, limit, fixed))
            try:
                ranks = plan(self.config, base, limit, strategies=self.strategies).ranks
            except ConfigError as err:
                problems.update({p: f"{p} (layers such as {where})" for p in err.problems if p not in problems})
                continue
            if fixed and set(ranks) != {base}:
                problems.setdefault("sharded", _SHARDED_RANK.format(schedule=self.config.rank_schedule, base=base,
                                                                    where=f"the links of {where}", rank=list(ranks)))
        if problems:
            raise ConfigError(list(problems.values()))

    def _start_link(self, closure: Closure | None, ranks: dict[str, int] | None = None,
                    keep: set[str] = frozenset()) -> None:
        """Re-init every layer for link ``self.link`` (the strategy's ``prepare`` first, once); the layers
        in ``keep`` whose rank is already the link's keep their factors."""
        ranks = ranks or {name: self._rank_for(name, self.link) for name in self.layers}
        self.link_starts = {name: len(layer.links) for name, layer in self.layers.items()}
        reinit = self.strategies["reinit"]
        kept = {name for name in keep if self.layers[name].rank == ranks[name]}
        prepare = getattr(reinit, "prepare", None)
        if prepare is not None and len(kept) < len(self.layers):
            with torch.enable_grad():
                prepare(self.layers, ranks, PrepareInfo(self.link, self.generator, closure))
        for name, layer in self.layers.items():
            if name not in kept:
                reinit.reinit(layer, ranks[name], ReinitInfo(name, self.link, self.generator))
        self._repoint_optimizer()

    # ------------------------------------------------------------------ training
    def _step_info(self, loss: float | None = None) -> StepInfo:
        return StepInfo(self.step_count, self.config.total_steps, self.link, self.last_knot, loss)

    def lr_multiplier(self) -> float:
        """The factor the LR policy applies to every param group's LR for the next step."""
        T = self.config.total_steps
        knots = self.planned_knots() or []
        link_end = next((k for k in knots if k > self.last_knot), T)
        cfg = self.config
        info = LRInfo(self.step_count, T, self.link, self.last_knot, link_end,
                      lambda taken, horizon: schedule_multiplier(cfg.lr_schedule, taken, horizon, cfg.warmup_steps))
        return float(self.strategies["lr_policy"].multiplier(info))

    def step(self, loss: torch.Tensor | float | None = None, closure: Closure | None = None) -> guard.Verdict:
        """Take one optimizer step, then tie a knot if the merge policy says so.

        With ``skip_nonfinite`` (the default) a step whose loss or LoRA gradients are not finite
        leaves the weights and the optimizer state as they were; it still counts as a step of the
        schedule, and is counted in ``nonfinite_steps`` / ``nonfinite_in_row``. Nothing is read
        back to the host on a step that is not a knot: the returned :class:`~cola.guard.Verdict`
        is true when the step was taken, and evaluating it reads that one flag. (On an accelerator
        that holds for fused optimizers, which skip inside their kernel; PyTorch's non-fused Adam
        keeps its step counter in host memory, so undoing a step there copies the flag to the host:
        pass ``fused=True``, as ``cola train`` does on CUDA.)

        ``closure`` (see :data:`Closure`) lets a re-init strategy probe the gradient at a knot.
        ``loss`` is read (a host sync) only when a plugin or the merge policy needs its value.
        """
        factor = self.lr_multiplier()
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            found = self.guarded_step(loss, self.config.skip_nonfinite)
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr
        if self.scheduler is not None:
            self.scheduler.step()
        needed = self._notify_steps or self._loss_needed or not isinstance(loss, torch.Tensor)
        self._advance(_as_float(loss) if needed else None, closure)
        return guard.Verdict(found)

    def advance(self, loss: float | None = None, closure: Closure | None = None) -> KnotReport | None:
        """Count one optimizer step taken by someone else (e.g. transformers' Trainer) and tie a
        knot if the merge policy says so."""
        self.counts.taken()
        return self._advance(loss, closure)

    def _advance(self, loss: float | None, closure: Closure | None) -> KnotReport | None:
        self.step_count += 1
        if self._notify_steps:
            self.pm.notify("cola_after_step", chain=self, step=self.step_count, loss=loss)
        if self.strategies["merge_policy"].is_knot(self._step_info(loss)):
            return self.tie_knot(forced=False, closure=closure)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the knot
    @torch.no_grad()
    def tie_knot(self, forced: bool = True, closure: Closure | None = None) -> KnotReport:
        """Merge the live link into the weights and start the next one, now."""
        start = time.perf_counter()
        merged_link, step = self.link, self.step_count
        self.pm.notify("cola_before_merge", chain=self, link=merged_link, step=step)
        dt.reshard_fsdp(self.model)  # FSDP: merge into the shards, never into a transient unsharded copy
        grad_norm = self._grad_norm() if self.config.diagnostics else None
        # everything the knot needs is checked before anything is written: the next link's ranks
        # (a schedule whose plan is not known ahead may give a bad one only now) and finite updates
        ranks = {name: self._rank_for(name, merged_link + 1) for name in self.layers}
        updates = self._checked_updates(merged_link, step)
        for name, layer in self.layers.items():            # nothing is written before this loop
            layer.fold_(*updates[name][:3])
            layer.lora_B.zero_()
        norms = {name: u[3] for name, u in updates.items()}
        del updates
        diagnostics = self._diagnostics() if self.config.diagnostics else {}
        self.link += 1
        self._start_link(closure, ranks)
        info = self._step_info()
        self.strategies["optimizer_policy"].apply(self.optimizer, self.params, info)
        self._drop_mismatched_state()
        on_knot = getattr(self.strategies["lr_policy"], "on_knot", None)
        if on_knot is not None:
            on_knot(info)
        self.last_knot = step
        report = KnotReport(link=merged_link, step=step, norms=norms, seconds=0.0,
                            new_rank=max(layer.rank for layer in self.layers.values()), forced=forced,
                            grad_norm=grad_norm, **diagnostics)
        report.seconds = time.perf_counter() - start
        self.history.append(report)
        log.info("knot %d at step %d: merged link %d into %d layers (mean |dW|_F %.3g), next rank %d, %.1f ms",
                 len(self.history), step, merged_link, len(norms), sum(norms.values()) / len(norms),
                 report.new_rank, 1e3 * report.seconds)
        self.pm.notify("cola_after_merge", chain=self, report=report)
        return report

    def _checked_updates(self, link: int, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, float]]:
        """Every layer's (B, A, scale, norm) from the merge rule, refused if any would not be finite.

        The checks stay on the device and are read back once for all layers (one host sync).
        """
        rule = self.strategies["merge_rule"]
        factors, checks = {}, []
        for name, layer in self.layers.items():
            B, A, scale = rule.factors(layer)
            B, A, scale = dt.full(B.detach()), dt.full(A.detach()), float(scale)  # gathered if FSDP shards them
            weight = layer.base.weight.detach()
            update = (B.float() @ A.float()) * scale
            limit = torch.finfo(weight.dtype).max if weight.dtype.is_floating_point else math.inf
            # |W + dW| <= max|W| + max|dW| < the dtype's largest value means no overflow is possible
            # (max|W| over every shard of an FSDP weight, so every rank refuses alike)
            headroom = (update.abs().amax() + dt.absmax(weight).to(update.device) if update.numel()
                        else update.new_zeros(()))
            norm = torch.linalg.matrix_norm(update) if update.numel() else update.new_zeros(())
            checks.append(torch.stack([norm, headroom / limit if math.isfinite(limit) else headroom * 0]))
            factors[name] = (B, A, scale)
            del update
        values = torch.stack([c.to(checks[0].device) for c in checks]).tolist() if checks else []
        updates = {}
        for (name, (B, A, scale)), (norm, load) in zip(factors.items(), values):
            if not (math.isfinite(scale) and math.isfinite(norm) and math.isfinite(load) and load < 1.0):
                raise NonFiniteMergeError(
                    f"knot refused at step {step}: link {link} of layer {name!r} has a non-finite update "
                    f"(or one that overflows {self.layers[name].base.weight.dtype}); no weight was changed")
            updates[name] = (B, A, scale, norm)
        return updates

    def _repoint_optimizer(self) -> None:
        """After a rank change a layer has new Parameter objects: swap them into the optimizer."""
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        swapped = {id(old): new for old, new in zip(self.params, params) if old is not new}
        if swapped:
            for group in self.optimizer.param_groups:
                group["params"] = [swapped.get(id(p), p) for p in group["params"]]
            for old in self.params:
                if id(old) in swapped and old in self.optimizer.state:
                    self.optimizer.state[swapped[id(old)]] = self.optimizer.state.pop(old)
        self.params = params

    def _drop_mismatched_state(self) -> None:
        for p in self.params:
            state = self.optimizer.state.get(p)
            if state and any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape
                             for v in state.values()):
                del self.optimizer.state[p]

    def _grad_norm(self) -> float:
        grads = [dt.full(p.grad.detach()).float().norm() for p in self.params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _diagnostics(self) -> dict[str, Any]:
        """Per layer: effective rank and norm of the accumulated update, overlap of the newest link."""
        if not self.config.record_links:
            return {}
        stats = {name: update_stats(layer.links, self.link_starts.get(name)) for name, layer in self.layers.items()
                 if layer.links}
        return {"effective_rank": {n: s.effective_rank for n, s in stats.items()},
                "accumulated_norm": {n: s.accumulated_norm for n, s in stats.items()},
                "overlap": {n: s.overlap for n, s in stats.items()}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (see :func:`cola.chain_state.state_dict`); under FSDP
        a collective that every rank calls."""
        return chain_state.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto a chain over a freshly injected copy of the same base model."""
        chain_state.load_state_dict(self, state)

    def stacked_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the whole chain as one adapter: ``W_0 + B_cat @ A_cat`` (see :func:`cola.stacked_factors`)."""
        if not self.config.record_links:
            raise ConfigError("the chain was built with record_links=False: its links cannot be exported")
        return {name: stacked_factors(layer) for name, layer in self.layers.items()}
