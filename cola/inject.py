"""Putting LoRA layers into a model: by module-name patterns, with per-family defaults."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .errors import ConfigError
from .lora import LoRALinear

log = logging.getLogger(__name__)

# Model families (``config.model_type``) whose attention uses q_proj / v_proj: the paper's targets.
_QV_FAMILIES = {"opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"}


def default_target_modules(model: nn.Module) -> list[str]:
    """The paper's targets (q_proj, v_proj) for OPT / Llama-like models; else every Linear but lm_head."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _QV_FAMILIES:
        return ["q_proj", "v_proj"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to put LoRA on")
    return names


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def inject_lora(model: nn.Module, target_modules: list[str] | str | None = None, rank: int = 8,
                alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
                lora_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches a pattern in a :class:`LoRALinear`, in place.

    A pattern matches a module name if it equals it, is a dotted suffix of it (``"q_proj"``
    matches ``"model.layers.0.self_attn.q_proj"``), or matches it as a regular expression.
    All other parameters of the model are frozen. Returns the wrapped module names.

    Raises:
        ConfigError: a pattern matches no Linear layer (the message lists the candidates),
            the model has no Linear layer, or rank / alpha / dropout are out of range
            (all problems are reported together).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is None:
        target_modules = default_target_modules(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to put LoRA on")
    already = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if already:
        raise ConfigError(f"model already has LoRA layers ({already[0]}, ...): inject once")
    chosen = [n for n in linears if any(_matches(n, p) for p in target_modules)]
    problems = []
    for pattern in target_modules:
        if not any(_matches(n, pattern) for n in linears):
            leaves = sorted({n.split(".")[-1] for n in linears})
            problems.append(f"target module pattern {pattern!r} matches no nn.Linear; candidates: "
                            f"{', '.join(leaves[:30])}" + (" ..." if len(leaves) > 30 else ""))
    if problems:
        raise ConfigError(problems)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    try:
        for name in chosen:
            wrapped[name] = LoRALinear(linears[name], rank, alpha, dropout, rslora, lora_dtype)
    except ConfigError as err:
        raise ConfigError([f"{name}: {p}" for p in err.problems]) from None
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    log.info("LoRA rank %d (alpha %g) on %d layers matching %s", rank, alpha, len(wrapped), target_modules)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every live link and put the plain (merged) ``nn.Linear`` back in place of each LoRA layer."""
    for name, layer in lora_layers(model).items():
        layer.merge_()
        if layer.residual is not None:  # the stored weight is already the best rounding
            layer.residual = None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model
