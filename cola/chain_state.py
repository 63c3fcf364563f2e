"""The chain's saved state: everything needed to continue exactly, and the checks before restoring it.

:meth:`cola.Chain.state_dict` and :meth:`cola.Chain.load_state_dict` are these two functions. A
state holds the layers (live factors, merged weights, compensation buffers, folded links), the
optimizer, scheduler and strategy states, the RNG and a fingerprint of the frozen base model, so
that a resume onto a different model, different layers or a different config is refused with the
differences named.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import _dtensor as dt
from ._version import __version__
from .errors import ConfigError
from .lora import LoRALinear
from .strategies import KnotReport

STATE_VERSION = 1


@torch.no_grad()
def frozen_fingerprint(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, list]:
    """Shape, dtype and float64 sum of every parameter and buffer the chain never changes.

    Saved with the chain's state, so resuming on a different base model is refused, naming
    the parameters that differ. The LoRA layers' own weights and factors are excluded (the state
    holds them, with the compensation of a bf16/fp16 chain, which is not a registered buffer).
    """
    skip = {f"{name}.{part}" for name in layers for part in ("base.weight", "lora_A", "lora_B")}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: [list(t.shape), str(t.dtype), dt.sum64(t) if t.is_floating_point() else 0.0]
            for name, t in tensors if name not in skip and t is not None}


def _close(a: list, b: list) -> bool:
    return a[:2] == b[:2] and math.isclose(a[2], b[2], rel_tol=1e-9, abs_tol=1e-9)


def state_dict(chain) -> dict[str, Any]:
    """Everything needed to continue exactly: layers (factors, merged weights), optimizer, strategies, RNG.

    Under FSDP the sharded tensors are gathered (to CPU, one layer at a time), so the state
    loads on any number of ranks; every rank must call this then (it is a collective).
    """
    layers = {}
    for name, layer in chain.layers.items():
        weight = layer.base.weight
        layers[name] = {
            "A": dt.full_copy(layer.lora_A), "B": dt.full_copy(layer.lora_B),
            "train_A": layer.lora_A.requires_grad, "train_B": layer.lora_B.requires_grad,
            "weight": dt.full_copy(weight),
            "residual": dt.full_copy(None if layer.residual is None else layer.residual.to(dt.local(weight).device),
                                     like=weight),
            "links": [(b.clone(), a.clone(), s) for b, a, s in layer.links],
        }
    strategies = {kind: s.state_dict() for kind, s in chain.strategies.items() if hasattr(s, "state_dict")}
    rng = {"chain": chain.generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "version": STATE_VERSION, "config": chain.config.to_dict(), "step": chain.step_count,
        "nonfinite_steps": chain.nonfinite_steps,
        "versions": {"chain-of-lora": __version__, "torch": torch.__version__},
        "fingerprint": frozen_fingerprint(chain.model, chain.layers),
        "link": chain.link, "last_knot": chain.last_knot, "base_ranks": dict(chain.base_ranks),
        "link_starts": dict(chain.link_starts), "history": [r.to_dict() for r in chain.history], "layers": layers,
        "optimizer": dt.gather_tree(chain.optimizer.state_dict()),
        "scheduler": chain.scheduler.state_dict() if chain.scheduler is not None else None,
        "strategies": strategies, "rng": rng,
    }

@torch.no_grad()
def load_state_dict(chain, state: dict[str, Any]) -> None:
    """Restore a :meth:`state_dict` onto a chain over a freshly injected copy of the same base model
    (sharded by FSDP or not, on any number of ranks: each rank writes its own shards)."""
    problems = []
    if state.get("version") != STATE_VERSION:
        problems.append(f"chain state version {state.get('version')!r}; this library reads {STATE_VERSION}")
    saved_cfg, cfg = state.get("config", {}), chain.config.to_dict()
    differing = sorted(k for k in set(saved_cfg) | set(cfg) if saved_cfg.get(k) != cfg.get(k))
    if differing:
        problems.append("config differs from the saved chain's in: " + ", ".join(
            f"{k} (saved {saved_cfg.get(k)!r}, now {cfg.get(k)!r})" for k in differing))
    saved_layers = state.get("layers", {})
    if set(saved_layers) != set(chain.layers):
        missing, extra = sorted(set(chain.layers) - set(saved_layers)), sorted(set(saved_layers) - set(chain.layers))
        problems.append(f"LoRA layers differ: not in the saved chain {missing[:5]}, only in it {extra[:5]}")
    else:
        for name, saved in saved_layers.items():
            if tuple(saved["weight"].shape) != tuple(chain.layers[name].base.weight.shape):
                problems.append(f"{name}: saved weight {tuple(saved['weight'].shape)} vs model "
                                f"{tuple(chain.layers[name].base.weight.shape)}")
    saved_print = state.get("fingerprint")
    if saved_print is not None and not problems:
        now = frozen_fingerprint(chain.model, chain.layers)
        differing = sorted(k for k in set(saved_print) | set(now)
                           if k not in now or k not in saved_print or not _close(saved_print[k], now[k]))
        if differing:
            problems.append(f"the model differs from the one the chain was saved with, in {len(differing)} "
                            f"parameters/buffers: {', '.join(differing[:5])}" + (" ..." if len(differing) > 5 else ""))
    if problems:
        raise ConfigError(problems)
    for name, layer in chain.layers.items():
        saved = saved_layers[name]
        layer.set_factors_(saved["A"], saved["B"], saved["train_A"], saved["train_B"])
        dt.copy_full_(layer.base.weight, saved["weight"])
        res = saved["residual"]
        layer.set_residual_(None if res is None else dt.local_chunk(res, layer.base.weight).clone())
        layer.links = [(b.clone(), a.clone(), s) for b, a, s in saved["links"]]
    chain._repoint_optimizer()
    chain.step_count, chain.link, chain.last_knot = state["step"], state["link"], state["last_knot"]
    chain.counts.set(state.get("nonfinite_steps", 0))  # a resumed chain starts a fresh run of skips in a row
    chain.base_ranks = dict(state["base_ranks"])
    chain.link_starts = dict(state.get("link_starts") or {n: len(layer.links) for n, layer in chain.layers.items()})
    chain.history = [KnotReport(**r) for r in state["history"]]
    chain.optimizer.load_state_dict(state["optimizer"])
    dt.redistribute_optimizer_state(chain.optimizer)
    if chain.scheduler is not None and state["scheduler"] is not None:
        chain.scheduler.load_state_dict(state["scheduler"])
    for kind, s in state["strategies"].items():
        chain.strategies[kind].load_state_dict(s)
    chain.generator.set_state(state["rng"]["chain"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
