"""How a run's model executes, not what it computes: the attention kernel, gradient checkpointing,
``torch.compile`` (the "performance" settings of ``cola train``).

* ``attn_implementation`` goes to ``from_pretrained`` (:func:`cola.llm.load_model`, the embedded model's
  cache folder included) and is set on models a custom loader builds (:func:`set_attention`).
* ``gradient_checkpointing`` uses transformers' non-reentrant activation checkpointing of each decoder
  layer (:func:`enable_checkpointing`), switched on before LoRA is injected and before FSDP shards the
  model: the layers keep only their inputs and recompute the rest in the backward pass.
* ``compile`` compiles the decoder in place (:func:`compile_decoder`): the objective calls
  ``model.get_decoder()`` and the LM head directly, never ``model.forward``. A knot folds the link into
  the base weights in place and (same rank) copies the new factors into the same Parameters, so the
  compiled graphs stay valid: no recompilation at a knot; a rank change gives the factors new shapes
  and recompiles once (the graphs' guards check parameter shapes, not values).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cola.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_BACKEND: Any = "inductor"
"""The ``torch.compile`` backend of ``compile``; tests put a compile-counting backend here."""


def set_attention(model, name: str | None) -> None:
    """Give ``model`` the attention kernel ``name`` (``eager``, ``sdpa``, ``flash_attention_2``, ...)
    when it has another one; ``None`` keeps what the model was loaded with."""
    config = getattr(model, "config", None)
    if name is None or getattr(config, "_attn_implementation", None) == name:
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as err:
        raise ConfigError(f"attn_implementation={name!r}: {err}") from None
    log.info("attention implementation: %s", name)


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant.

    Non-reentrant checkpointing (``use_reentrant=False``) is the variant that works with a frozen base
    and trainable LoRA factors: the reentrant one only back-propagates into a checkpointed segment when
    one of its *inputs* requires a gradient, which a frozen layer's hidden states need not. It also works
    under FSDP2 (transformers checkpoints the layer's ``forward``, so FSDP's hooks run outside it) and
    recomputes with the same RNG state (dropout included), so the gradients are the ones without it.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it ({err})") from None


def compile_decoder(model) -> None:
    """``torch.compile`` ``model``'s decoder in place (``nn.Module.compile``: names and state dicts unchanged).

    The compile caches are cleared first (``torch.compiler.reset``): every run of an experiment compiles
    its own model, and earlier runs' graphs would otherwise count against dynamo's recompile limit.
    """
    torch.compiler.reset()
    model.get_decoder().compile(backend=COMPILE_BACKEND)
    log.info("decoder compiled (torch.compile, backend %s): the first steps and evaluations compile",
             COMPILE_BACKEND if isinstance(COMPILE_BACKEND, str) else type(COMPILE_BACKEND).__name__)


def is_compiled(model) -> bool:
    """True when :func:`compile_decoder` compiled ``model``'s decoder."""
    return getattr(model.get_decoder(), "_compiled_call_impl", None) is not None


def prepare_base(model, settings) -> None:
    """What a freshly loaded base model gets before LoRA or sharding: the attention kernel and
    gradient checkpointing of ``settings``."""
    set_attention(model, settings.attn_implementation)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)


def prepare_training(model, settings) -> None:
    """What a run's model gets once it is set up (LoRA injected, sharded): ``torch.compile``."""
    if settings.compile:
        compile_decoder(model)
