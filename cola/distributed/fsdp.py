"""FSDP2 for COLA: the frozen base sharded per transformer block, LoRA factors replicated (or sharded)."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import torch
from torch import nn

from .. import _dtensor as dt
from ..errors import ColaError, ConfigError
from ..inject import lora_layers
from ..lora import LoRALinear
from .env import _require_group, device, is_initialized, world_size

log = logging.getLogger("cola.distributed")

# ============================================================================ FSDP

def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ColaError(f"FSDP2 (fully_shard) is not available in torch {torch.__version__}; "
                            "torch >= 2.4 is needed") from None
    return fully_shard


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks holding LoRA layers (a transformer's decoder layers), else the LoRA layers."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(isinstance(m, LoRALinear) for m in module.modules()):
            return list(module)
    return list(lora_layers(model).values())


def fsdp(model: nn.Module, blocks: Sequence[nn.Module] | None = None, shard_lora: bool = False,
         mesh=None, mp_policy=None, reshard_after_forward: bool = True, **kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``): each block, then the root. Returns ``model``.

    Call after :func:`cola.inject_lora` and before :class:`cola.Chain`. ``blocks`` defaults to
    the modules of the first ``nn.ModuleList`` that holds LoRA layers (a transformer's decoder
    layers), else every LoRA layer. With ``shard_lora=False`` (default) the LoRA factors are
    left out of FSDP (``ignored_params``): replicated, moved to this rank's device, their
    gradients averaged by :func:`sync_gradients`; rank schedules work. With ``shard_lora=True``
    FSDP shards and reduces them too (constant rank only; ``svd-truncate`` merges and
    ``prune`` need replicated factors). ``mesh`` defaults to a 1-D mesh over all ranks on
    :func:`device`'s type; ``mp_policy`` is FSDP's ``MixedPrecisionPolicy``.
    """
    if not is_initialized():
        _require_group()               # refuses a launched multi-rank run without init()
        return model
    fully_shard = _fully_shard()
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("fsdp(): the model has no LoRA layers; call cola.inject_lora first "
                          "(or use fully_shard directly for full fine-tuning)")
    dev = device()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world_size(),))
    lora_params = {p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    if not shard_lora:
        with torch.no_grad():
            for p in lora_params:
                p.data = p.data.to(dev)
    options: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if not shard_lora:
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ColaError(f"fully_shard of torch {torch.__version__} cannot leave the LoRA factors replicated "
                            "(no ignored_params; torch >= 2.7 has it): use fsdp(model, shard_lora=True)")
        options["ignored_params"] = lora_params
    for block in (_default_blocks(model) if blocks is None else blocks):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP module of ``model`` back into its sharded state (the chain does this itself
    before each knot: after an eval forward the root keeps its parameters unsharded)."""
    dt.reshard_fsdp(model)
