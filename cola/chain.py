"""The chain: a residual, Frank-Wolfe-style optimizer over successive LoRA links.

``Chain`` wraps any torch model with LoRA layers and any torch optimizer. Each ``step()`` it
takes the optimizer step, then asks the merge policy whether to tie a knot. At a knot, in
order: before-merge hooks, merge rule (checked finite for every layer before anything is
written), re-init strategy with the rank from the rank schedule, optimizer-state policy,
LR policy, after-merge hooks with a :class:`KnotReport`. All of the knot logic is here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import _dtensor as dt
from ._version import __version__
from .config import ChainConfig, schedule_multiplier
from .errors import ConfigError, NonFiniteMergeError
from .inject import lora_layers
from .lora import LoRALinear, stacked_factors
from .manager import PluginManager, get_plugin_manager
from .planning import Plan, build_strategies, check_rank, plan
from .strategies import LRInfo, ReinitInfo, StepInfo

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class KnotReport:
    """What happened at one knot."""

    link: int                         #: index of the link that was merged (0-based)
    step: int                         #: optimizer steps taken when the knot was tied
    norms: dict[str, float]           #: per layer: Frobenius norm of the folded update
    seconds: float                    #: wall time of the whole knot
    new_rank: int                     #: rank of the new link (the largest over layers)
    forced: bool = False              #: tied by ``Chain.tie_knot()`` rather than the merge policy
    grad_norm: float | None = None    #: with diagnostics: norm of the LoRA gradients at the knot
    effective_rank: dict[str, float] | None = field(default=None)  #: with diagnostics: per layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def frozen_fingerprint(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, list]:
    """Shape, dtype and float64 sum of every parameter and buffer the chain never changes.

    Saved with the chain's state, so resuming on a different base model is refused, naming
    the parameters that differ. The LoRA layers' own weights and compensation buffers are excluded
    (the state holds them; the buffer appears at the first knot of a bf16/fp16 chain).
    """
    skip = {f"{name}.{part}" for name in layers for part in ("base.weight", "lora_A", "lora_B", "residual")}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: [list(t.shape), str(t.dtype), dt.sum64(t) if t.is_floating_point() else 0.0]
            for name, t in tensors if name not in skip and t is not None}


def effective_rank(B: torch.Tensor, A: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli) of ``B @ A`` from its factors, without forming it."""
    if B.numel() == 0:
        return 0.0
    _, RB = torch.linalg.qr(B.double())
    _, RA = torch.linalg.qr(A.double().T)
    s = torch.linalg.svdvals(RB @ RA.T)
    s = s[s > s.max() * 1e-12] if s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _as_float(loss: torch.Tensor | float | None) -> float | None:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach())
    return None if loss is None else float(loss)


def _close(a: list, b: list) -> bool:
    return a[:2] == b[:2] and math.isclose(a[2], b[2], rel_tol=1e-9, abs_tol=1e-9)


class Chain:
    """Chain of LoRA: train a link, tie a knot (merge + restart), repeat.

    Args:
        model: any torch model with LoRA layers (see :func:`cola.inject_lora`).
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
        self.layers: dict[str, LoRALinear] = lora_layers(model)
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no LoRA layers: call cola.inject_lora(model, ...) first")
        self.pm = plugin_manager or get_plugin_manager()
        self.strategies = self._build_strategies()
        self.base_ranks = {name: layer.rank for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.record_links = config.record_links
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self.link = 0
        self.last_knot = 0
        self.history: list[KnotReport] = []
        self.nonfinite_steps = 0          # steps skipped because loss or gradients were not finite
        self.nonfinite_in_row = 0
        self._check_planned_ranks()
        self.params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        optimizer = optimizer_factory(self.params)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate / Trainer wrappers
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer_factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        self.optimizer = optimizer
        for name, layer in self.layers.items():     # link 0, initialised by the strategies too
            self._reinit(name, layer)
        self._repoint_optimizer()
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self._notify_steps = self.pm.has_impls("cola_after_step")

    # ------------------------------------------------------------------ set-up
    def _build_strategies(self) -> dict[str, Any]:
        return build_strategies(self.config, self.pm)

    def plan(self) -> Plan:
        """The chain's :class:`cola.Plan` (knots, rank per link) for the largest base rank of its layers."""
        base = max(self.base_ranks.values())
        return plan(self.config, base, None, strategies=self.strategies)

    def planned_knots(self) -> list[int] | None:
        """The knots the merge policy will tie, when it knows them in advance."""
        planned = getattr(self.strategies["merge_policy"], "planned_knots", None)
        return planned() if planned is not None else None

    def planned_ranks(self) -> list[int]:
        """The rank (for the layers' base rank) of each planned link."""
        return list(self.plan().ranks)

    def _rank_for(self, name: str, link: int) -> int:
        rank = self.strategies["rank_schedule"].rank(link, self.base_ranks[name])
        return check_rank(rank, self.layers[name].max_rank, self.config.rank_schedule, link, f" of {name}")

    def _check_planned_ranks(self) -> None:
        """The plan holds for every layer: each (base rank, largest rank) pair is checked once."""
        problems = []
        pairs = sorted({(self.base_ranks[n], layer.max_rank) for n, layer in self.layers.items()})
        for base, limit in pairs:
            try:
                plan(self.config, base, limit, strategies=self.strategies)
            except ConfigError as err:
                where = [n for n, layer in self.layers.items() if (self.base_ranks[n], layer.max_rank) == (base, limit)]
                problems += [f"{p} (layers such as {where[0]})" for p in err.problems if p not in problems]
        if problems:
            raise ConfigError(problems)

    def _reinit(self, name: str, layer: LoRALinear, rank: int | None = None) -> None:
        rank = self._rank_for(name, self.link) if rank is None else rank
        self.strategies["reinit"].reinit(layer, rank, ReinitInfo(name, self.link, self.generator))

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

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Take one optimizer step, then tie a knot if the merge policy says so.

        A step whose loss or LoRA gradients are not finite is skipped (gradients dropped,
        ``nonfinite_steps`` and ``nonfinite_in_row`` counted, not a step of the chain) and
        ``False`` is returned; the caller decides when too many in a row end the run.
        """
        loss_value = None
        if self.config.skip_nonfinite:
            loss_value = _as_float(loss)
        if self.config.skip_nonfinite and (
                (loss_value is not None and not math.isfinite(loss_value)) or not self._grads_finite()):
            self.nonfinite_steps += 1
            self.nonfinite_in_row += 1
            log.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", self.step_count + 1,
                        "loss" if loss_value is not None and not math.isfinite(loss_value) else "gradient",
                        self.nonfinite_in_row, self.nonfinite_steps)
            self.zero_grad()
            return False
        factor = self.lr_multiplier()
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr
        if self.scheduler is not None:
            self.scheduler.step()
        self.advance(loss_value if self.config.skip_nonfinite else _as_float(loss))  # read after the step is queued
        return True

    def advance(self, loss: float | None = None) -> KnotReport | None:
        """Count one optimizer step taken by someone else (e.g. transformers' Trainer) and tie a
        knot if the merge policy says so. :meth:`step` calls this after its own optimizer step."""
        self.step_count += 1
        self.nonfinite_in_row = 0
        if self._notify_steps:
            self.pm.notify("cola_after_step", chain=self, step=self.step_count, loss=loss)
        if self.strategies["merge_policy"].is_knot(self._step_info(loss)):
            return self.tie_knot(forced=False)
        return None

    def _grads_finite(self) -> bool:
        """True when every LoRA gradient is finite: one fused max-abs per device, one host sync."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        sharded = dt.any_dtensor(grads)  # FSDP-sharded factors: each rank sees its shard only
        by_device: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            g = dt.local(g.detach())
            by_device.setdefault((g.device, g.dtype), []).append(g)
        maxima = [m.float() for group in by_device.values() for m in torch._foreach_norm(group, math.inf)]
        device = maxima[0].device
        finite = torch.stack([m.to(device) for m in maxima]).isfinite().all()
        if sharded:  # every rank must take (or skip) the step alike
            import torch.distributed as dist

            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the knot
    @torch.no_grad()
    def tie_knot(self, forced: bool = True) -> KnotReport:
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
        self.link += 1
        for name, layer in self.layers.items():
            self._reinit(name, layer, ranks[name])
        self._repoint_optimizer()
        info = self._step_info()
        self.strategies["optimizer_policy"].apply(self.optimizer, self.params, info)
        self._drop_mismatched_state()
        on_knot = getattr(self.strategies["lr_policy"], "on_knot", None)
        if on_knot is not None:
            on_knot(info)
        self.last_knot = step
        report = KnotReport(
            link=merged_link, step=step, norms=norms, seconds=0.0,
            new_rank=max(layer.rank for layer in self.layers.values()), forced=forced, grad_norm=grad_norm,
            effective_rank=self._effective_ranks() if self.config.diagnostics else None)
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

    def _effective_ranks(self) -> dict[str, float] | None:
        if not self.config.record_links:
            return None
        out = {}
        for name, layer in self.layers.items():
            if layer.links:
                B = torch.cat([b * s for b, _, s in layer.links], dim=1)
                A = torch.cat([a for _, a, _ in layer.links], dim=0)
                out[name] = effective_rank(B, A)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: layers (factors, merged weights), optimizer, strategies, RNG.

        Under FSDP the sharded tensors are gathered (to CPU, one layer at a time), so the state
        loads on any number of ranks; every rank must call this then (it is a collective).
        """
        layers = {}
        for name, layer in self.layers.items():
            weight = layer.base.weight
            layers[name] = {
                "A": dt.full_copy(layer.lora_A), "B": dt.full_copy(layer.lora_B),
                "train_A": layer.lora_A.requires_grad, "train_B": layer.lora_B.requires_grad,
                "weight": dt.full_copy(weight),
                "residual": dt.full_copy(layer.residual, like=weight),
                "links": [(b.clone(), a.clone(), s) for b, a, s in layer.links],
            }
        strategies = {kind: s.state_dict() for kind, s in self.strategies.items() if hasattr(s, "state_dict")}
        rng = {"chain": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": STATE_VERSION, "config": self.config.to_dict(), "step": self.step_count,
            "nonfinite_steps": self.nonfinite_steps,
            "versions": {"chain-of-lora": __version__, "torch": torch.__version__},
            "fingerprint": frozen_fingerprint(self.model, self.layers),
            "link": self.link, "last_knot": self.last_knot, "base_ranks": dict(self.base_ranks),
            "history": [r.to_dict() for r in self.history], "layers": layers,
            "optimizer": dt.gather_tree(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "strategies": strategies, "rng": rng,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto a chain over a freshly injected copy of the same base model
        (sharded by FSDP or not, on any number of ranks: each rank writes its own shards)."""
        problems = []
        if state.get("version") != STATE_VERSION:
            problems.append(f"chain state version {state.get('version')!r}; this library reads {STATE_VERSION}")
        saved_cfg, cfg = state.get("config", {}), self.config.to_dict()
        differing = sorted(k for k in set(saved_cfg) | set(cfg) if saved_cfg.get(k) != cfg.get(k))
        if differing:
            problems.append("config differs from the saved chain's in: " + ", ".join(
                f"{k} (saved {saved_cfg.get(k)!r}, now {cfg.get(k)!r})" for k in differing))
        saved_layers = state.get("layers", {})
        if set(saved_layers) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(saved_layers)), sorted(set(saved_layers) - set(self.layers))
            problems.append(f"LoRA layers differ: not in the saved chain {missing[:5]}, only in it {extra[:5]}")
        else:
            for name, saved in saved_layers.items():
                if tuple(saved["weight"].shape) != tuple(self.layers[name].base.weight.shape):
                    problems.append(f"{name}: saved weight {tuple(saved['weight'].shape)} vs model "
                                    f"{tuple(self.layers[name].base.weight.shape)}")
        saved_print = state.get("fingerprint")
        if saved_print is not None and not problems:
            now = frozen_fingerprint(self.model, self.layers)
            differing = sorted(k for k in set(saved_print) | set(now)
                               if k not in now or k not in saved_print or not _close(saved_print[k], now[k]))
            if differing:
                problems.append(f"the model differs from the one the chain was saved with, in {len(differing)} "
                                f"parameters/buffers: {', '.join(differing[:5])}" + (" ..." if len(differing) > 5 else ""))
        if problems:
            raise ConfigError(problems)
        for name, layer in self.layers.items():
            saved = saved_layers[name]
            layer.set_factors_(saved["A"], saved["B"], saved["train_A"], saved["train_B"])
            dt.copy_full_(layer.base.weight, saved["weight"])
            res = saved["residual"]
            layer.residual = None if res is None else dt.local_chunk(res, layer.base.weight).to(
                dt.local(layer.base.weight).device).clone()
            layer.links = [(b.clone(), a.clone(), s) for b, a, s in saved["links"]]
        self._repoint_optimizer()
        self.step_count, self.link, self.last_knot = state["step"], state["link"], state["last_knot"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.base_ranks = dict(state["base_ranks"])
        self.history = [KnotReport(**r) for r in state["history"]]
        self.optimizer.load_state_dict(state["optimizer"])
        dt.redistribute_optimizer_state(self.optimizer)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for kind, s in state["strategies"].items():
            self.strategies[kind].load_state_dict(s)
        self.generator.set_state(state["rng"]["chain"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def stacked_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the whole chain as one adapter: ``W_0 + B_cat @ A_cat`` (see :func:`cola.stacked_factors`)."""
        if not self.config.record_links:
            raise ConfigError("the chain was built with record_links=False: its links cannot be exported")
        return {name: stacked_factors(layer) for name, layer in self.layers.items()}
