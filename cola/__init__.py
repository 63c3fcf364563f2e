"""chain-of-lora: Chain of LoRA (COLA) fine-tuning, with merge-and-restart strategies as plugins.

    import torch, cola
    cola.inject_lora(model, target_modules=["q_proj", "v_proj"], rank=8, alpha=16)
    chain = cola.Chain(model, lambda params: torch.optim.AdamW(params, lr=1e-3),
                       cola.ChainConfig(total_steps=300, links=3))
    for batch in batches:
        loss_fn(model, batch).backward()
        chain.step(); chain.zero_grad()
"""

from ._version import __version__  # noqa: F401 (re-exported)
from .chain import Chain, KnotReport, effective_rank
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ChainConfig
from .errors import ColaError, ConfigError, NonFiniteMergeError, PluginError, UnknownStrategyError
from .hookspecs import hookimpl, hookspec
from .inject import default_target_modules, inject_lora, lora_layers, merge_and_unload
from .lora import LoRALinear, stacked_factors
from .manager import PluginManager, get_plugin_manager
from .peft_models import to_peft
from .planning import Plan, plan
from .strategies import LRInfo, ReinitInfo, StepInfo


__all__ = [
    "Chain", "ChainConfig", "KnotReport", "Plan", "plan", "LoRALinear", "PluginManager", "StepInfo", "ReinitInfo", "LRInfo",
    "ColaError", "ConfigError", "NonFiniteMergeError", "PluginError", "UnknownStrategyError",
    "inject_lora", "lora_layers", "merge_and_unload", "default_target_modules", "stacked_factors",
    "effective_rank", "hookimpl", "hookspec", "get_plugin_manager", "save_checkpoint", "load_checkpoint", "to_peft",
    "__version__",
]
