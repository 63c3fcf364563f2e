"""Exporting a chain as PEFT-format LoRA adapters: the whole chain as one, and each link alone.

The whole chain ``W_0 + sum_j s_j B_j A_j`` is one LoRA adapter of rank ``sum_j r_j`` over the
original base weights: ``A = [A_1; ...; A_m]``, ``B = [s_1 B_1, ..., s_m B_m]`` with
``lora_alpha = r`` (scale 1). ``peft.PeftModel.from_pretrained(base, folder)`` loads it. The
config is a ``peft.LoraConfig`` saved by itself; the files are written to a temporary folder and
renamed into place.

The factors are ``out x in`` for every layer. Over transformers' ``Conv1D`` (GPT-2), whose weight is
stored ``in x out``, PEFT wants ``fan_in_fan_out=True`` in the config (it then adds the transposed
update to the weight); the chain's exports set it when the adapted layers are Conv1D. (A config has
one such flag: with both kinds adapted, PEFT corrects it per layer, with a warning.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .chain import Chain
from .errors import ColaError, ConfigError
from .io import atomic_folder, make_folder, write_json
from .lora import LoRALinear


def _adapter_config(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str | None,
                    task_type: str | None, fan_in_fan_out: bool = False) -> Any:
    """The ``peft.LoraConfig`` of ``factors`` at scale 1: ``lora_alpha = r`` for every module."""
    from peft import LoraConfig

    ranks = {name: A.shape[0] for name, (_, A) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {name: k for name, k in ranks.items() if k != r}
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                      target_modules=sorted(factors), lora_dropout=0.0, bias="none", task_type=task_type,
                      base_model_name_or_path=base, inference_mode=True, fan_in_fan_out=fan_in_fan_out)


def write_adapter(folder: str | os.PathLike, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
                  fan_in_fan_out: bool = False) -> Path:
    """Write ``{module name: (B, A)}`` (scale 1) as a PEFT LoRA adapter folder, atomically.

    ``fan_in_fan_out``: the modules are transformers ``Conv1D`` layers (weights stored ``in x out``);
    ``B`` and ``A`` are ``out x r`` and ``r x in`` all the same.
    """
    from safetensors.torch import save_file

    if not factors:
        raise ConfigError("nothing to export: no LoRA layers")
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    config = _adapter_config(factors, base_model_name_or_path, task_type, fan_in_fan_out)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        config.save_pretrained(str(tmp))

    return atomic_folder(folder, write, "adapter")


def _base_name(chain: Chain, given: str | None) -> str | None:
    if given is not None:
        return given
    return getattr(getattr(chain.model, "config", None), "_name_or_path", None) or None


def _fan_in_fan_out(chain: Chain) -> bool:
    """PEFT's flag for the chain's layers: set when any is a Conv1D (see the module docstring)."""
    return any(layer.transposed for layer in chain.layers.values())


def save_peft_adapter(chain: Chain, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                      task_type: str | None = "CAUSAL_LM") -> Path:
    """The whole chain (folded links and the live one) as one PEFT adapter over the original weights."""
    return write_adapter(folder, chain.stacked_factors(), _base_name(chain, base_model_name_or_path), task_type,
                         _fan_in_fan_out(chain))


def link_factors(layer: LoRALinear) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each link of a layer as ``(s_j B_j, A_j)``: the folded ones, then the live one if non-zero."""
    links = [(B * s, A) for B, A, s in layer.links]
    if torch.count_nonzero(layer.lora_B) and torch.count_nonzero(layer.lora_A):
        links.append((layer.lora_B.detach().float().cpu() * layer.scaling, layer.lora_A.detach().float().cpu()))
    return links


def save_link_adapters(chain: Chain, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                       task_type: str | None = "CAUSAL_LM") -> Path:
    """Each link as its own PEFT adapter (``link-00``, ``link-01``, ...) plus ``manifest.json``.

    Applying all of them together reproduces :func:`save_peft_adapter`. Links that a re-init
    strategy folded out of the weights (PiSSA) appear as their own, negative entries.
    """
    if not chain.config.record_links:
        raise ConfigError("the chain was built with record_links=False: its links cannot be exported")
    per_layer = {name: link_factors(layer) for name, layer in chain.layers.items()}
    counts = {len(v) for v in per_layer.values()}
    if len(counts) != 1:
        raise ColaError(f"layers hold different numbers of links ({sorted(counts)}): cannot export per link")
    folder = make_folder(folder, "link adapters")
    base = _base_name(chain, base_model_name_or_path)
    knots = [r.step for r in chain.history]
    entries = []
    for j in range(counts.pop()):
        sub = write_adapter(folder / f"link-{j:02d}", {n: f[j] for n, f in per_layer.items()}, base, task_type,
                            _fan_in_fan_out(chain))
        entries.append({"index": j, "folder": sub.name, "rank": max(f[j][1].shape[0] for f in per_layer.values()),
                        "ended_at_step": knots[j] if j < len(knots) else None})
    manifest = {"base_model_name_or_path": base, "total_steps": chain.config.total_steps,
                "steps_taken": chain.step_count, "knots": knots, "links": entries,
                "note": "W = W_0 + sum of every link's B @ A (each adapter has scale 1)"}
    write_json(folder / "manifest.json", manifest)
    return folder
