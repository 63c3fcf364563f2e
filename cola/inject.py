"""Putting LoRA layers into a model: by module-name patterns, with per-family defaults.

LoRA goes on ``nn.Linear`` layers and on transformers' ``Conv1D`` (GPT-2 and the checkpoints built
on it). A layer whose weight is tied to another module (an LM head sharing the input embedding) is
refused: a knot folds into the weight in place, so it would change the embedding too.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .errors import ConfigError
from .lora import ADAPTABLE, LoRALinear, is_adaptable

log = logging.getLogger(__name__)

_QV = ("q_proj", "v_proj")
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    **{family: _QV for family in ("opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                  "olmo", "olmo2", "smollm3", "phi", "gptj")},
    "phi3": ("qkv_proj",),                   # q, k and v fused in one nn.Linear
    "gpt2": ("c_attn",),                     # q, k and v fused in one Conv1D
    "gpt_bigcode": ("c_attn",),              # the same name, an nn.Linear
    "gpt_neox": ("query_key_value",),
}
"""Default LoRA targets by ``config.model_type``: the paper's attention query and value projections,
or the fused projection that holds them where a family has no separate ones."""

# Without a family entry (or when the model lacks its names): the first of these the model has.
_ATTENTION_NAMES = (_QV, ("qkv_proj",), ("c_attn",), ("query_key_value",), ("Wqkv",))


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_adaptable(m)}


#: the default targets of a model whose language model sits beside other towers (Gemma 3's vision tower): a
#: regex of the layer name under its ``language_model``
LANGUAGE_MODEL_PATTERN = r"(.*\.)?language_model\.(.*\.)?{leaf}"


def _in_language_model(name: str) -> bool:
    return name.startswith("language_model.") or ".language_model." in name


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention's query and value projections (q_proj, v_proj: the paper's) or the fused one that
    holds them (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``), from :data:`FAMILY_TARGETS` or the model's own
    module names; a model with none of these gets every Linear / Conv1D but ``lm_head``. A multimodal model
    (a ``language_model`` beside a vision tower, as Gemma 3's) gets them in its language model only
    (:data:`LANGUAGE_MODEL_PATTERN`)."""
    layers = _adaptable(model)
    language = {n: m for n, m in layers.items() if _in_language_model(n)}
    if language and len(language) < len(layers):   # a multimodal model (Gemma 3): LoRA on its language model only
        layers = language
    leaves = {n.split(".")[-1] for n in layers}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY_TARGETS.get(model_type)

    def scoped(names) -> list[str]:
        return [LANGUAGE_MODEL_PATTERN.format(leaf=n) for n in names] if layers is language else list(names)

    if family is not None and set(family) <= leaves:
        return scoped(family)
    for names in _ATTENTION_NAMES:
        if set(names) <= leaves:
            if family is not None:
                log.warning("model type %r has no %s layers: LoRA defaults to %s", model_type,
                            "/".join(family), "/".join(names))
            return scoped(names)
    names = [n for n in layers if n.split(".")[-1] != "lm_head"]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no {ADAPTABLE} layer to put LoRA on")
    return names


def _tied_problems(model: nn.Module, layers: dict[str, nn.Module], chosen: list[str]) -> list[str]:
    """A chosen layer whose weight another module shares (tied word embeddings): a knot writes into it."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    problems = []
    for name in chosen:
        others = [o for o in owners.get(id(layers[name].weight), []) if o != f"{name}.weight"]
        if others:
            problems.append(f"{name}: its weight is tied to {others[0]} (tied word embeddings), so a knot would "
                            f"change both; leave it out of the target modules, or untie the weights first "
                            f"(config.tie_word_embeddings=False)")
    return problems


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
    """Wrap every ``nn.Linear`` (or transformers ``Conv1D``) whose name matches a pattern in a
    :class:`LoRALinear`, in place.

    A pattern matches a module name if it equals it, is a dotted suffix of it (``"q_proj"``
    matches ``"model.layers.0.self_attn.q_proj"``), or matches it as a regular expression.
    All other parameters of the model are frozen. Returns the wrapped module names.

    Raises:
        ConfigError: a pattern matches no Linear / Conv1D layer (the message lists the candidates),
            the model has none, a matched layer's weight is tied to another module, or rank /
            alpha / dropout are out of range (all problems are reported together).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is None:
        target_modules = default_target_modules(model)
    linears = _adaptable(model)
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no {ADAPTABLE} layer to put LoRA on")
    already = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if already:
        raise ConfigError(f"model already has LoRA layers ({already[0]}, ...): inject once")
    chosen = [n for n in linears if any(_matches(n, p) for p in target_modules)]
    problems = []
    for pattern in target_modules:
        if not any(_matches(n, pattern) for n in linears):
            leaves = sorted({n.split(".")[-1] for n in linears})
            problems.append(f"target module pattern {pattern!r} matches no {ADAPTABLE}; candidates: "
                            f"{', '.join(leaves[:30])}" + (" ..." if len(leaves) > 30 else ""))
    problems += _tied_problems(model, linears, chosen)
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
    """Fold every live link and put the plain (merged) ``nn.Linear`` / ``Conv1D`` back in place of each LoRA layer."""
    for name, layer in lora_layers(model).items():
        layer.merge_()
        if layer.residual is not None:  # the stored weight is already the best rounding
            layer.residual = None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model
