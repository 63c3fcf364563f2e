"""PEFT models in a chain: a ``peft.PeftModel`` trains as a chain and comes back a correct PeftModel.

    model = peft.get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    chain = cola.Chain(model, lambda params: torch.optim.AdamW(params, lr=1e-3), cola.ChainConfig(...))
    ... train ...
    cola.to_peft(chain)              # original base weights back, one adapter holding the whole chain
    model.save_pretrained("adapter")  # PeftModel.from_pretrained(original_base, "adapter") is the trained model

The bridge converts and converts back. While the chain trains, each of PEFT's LoRA layers of the
(single) adapter is swapped for a :class:`cola.LoRALinear` over the same ``base_layer``, holding
PEFT's own factor Parameters (so an optimizer built over the PeftModel's parameters before the swap
stays attached), its dropout module, and its scaling (``r``, ``lora_alpha``, ``rank_pattern`` /
``alpha_pattern`` and ``use_rslora`` as PEFT resolved them per layer). The first link is PEFT's:
its factors are kept as ``init_lora_weights`` made them (or as a loaded adapter holds them) instead
of being re-initialised, as long as the rank schedule gives link 0 PEFT's rank. Knots merge into
``base_layer.weight``; an exact copy of each adapted weight as it was before the first knot is kept
in host memory.

Because the knots change the base weights, what PEFT's ``save_pretrained`` would write mid-chain is
neither the whole chain nor relative to the original base. :func:`to_peft` (``ColaCallback`` calls it
at ``on_train_end``) makes the model a correct PEFT model again: each adapted layer gets its original
base weight back and PEFT's layer returns, its adapter replaced by one holding the whole chain (``W_0
+ B_cat A_cat``, rank = the sum of the links' ranks). The LoraConfig keeps the user's ``lora_alpha``,
``alpha_pattern``, ``use_rslora``, ``target_modules`` (``"all-linear"`` included) and dropout; only
``r`` (the most common total rank) and ``rank_pattern`` (every layer whose total differs, by its exact
name) change, and ``B`` is divided by the scaling PEFT will apply, so that
``PeftModel.from_pretrained(original_base, folder)`` reproduces the trained model. For a checkpoint
taken mid-chain, :meth:`PeftBridge.save_adapter` writes that same adapter (over the original base)
without changing the live model: PEFT's own writer, run on a momentary PEFT form of the layers.

Refused, with one :class:`~cola.ConfigError` naming each: other tuner types (LoHa, LoKr, IA3, ...),
several adapters, DoRA and the other LoRA variants, ``lora_bias``, base-weight-changing inits
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: use ``reinit="pissa"`` of the chain instead), merged or
disabled adapters, layers that are not PEFT's plain ``Linear`` over an ``nn.Linear`` or transformers'
``Conv1D`` (GPT-2, with ``fan_in_fan_out=True``; quantized bases such as bitsandbytes / GPTQ / AWQ / HQQ,
embeddings and convolutions are refused), and
``record_links=False`` (the chain could not be exported).

``peft`` is imported only when a model is checked, so the rest of the library works without it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import shutil
import sys
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError
from .lora import LoRALinear, is_adaptable, is_conv1d, stacked_factors

__all__ = ["AdapterLayer", "PeftBridge", "attach", "bridge_of", "first_link_layers", "is_peft_model", "put_adapter",
           "take_adapter", "to_peft"]

log = logging.getLogger(__name__)

#: ``init_lora_weights`` values with which PEFT changes the base weight itself (the original is then lost)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PREFIX = "base_model.model."   # a PeftModel's inner model, as its module names (and adapter keys) begin

_BRIDGES: "weakref.WeakKeyDictionary[nn.Module, PeftBridge]" = weakref.WeakKeyDictionary()
# cola layers whose factors came from PEFT: a chain keeps them as its first link instead of re-initialising
_FIRST_LINK: "weakref.WeakSet[LoRALinear]" = weakref.WeakSet()


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when nothing did yet)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _has_peft_layers(model: nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def first_link_layers(layers: dict[str, LoRALinear]) -> set[str]:
    """The names among ``layers`` whose factors PEFT made (or an adapter loaded): the chain keeps them as
    link 0. Each layer is handed out once, so a later chain over the same layers re-initialises them."""
    kept = {name for name, layer in layers.items() if layer in _FIRST_LINK}
    for name in kept:
        _FIRST_LINK.discard(layers[name])
    return kept


# ---------------------------------------------------------------------------- checks and conversion
def _config_problems(model, record_links: bool) -> list[str]:
    """Everything about the PeftModel's adapters that a chain cannot take, each named."""
    problems = []
    configs = dict(model.peft_config)
    active = list(getattr(model, "active_adapters", None) or [])
    if len(configs) > 1:
        problems.append(f"the PeftModel has {len(configs)} adapters ({', '.join(sorted(configs))}): a chain trains one; "
                        "delete the others first (model.delete_adapter(name))")
    if len(active) != 1:
        problems.append(f"the PeftModel has {len(active)} active adapters ({', '.join(active) or 'none'}): a chain "
                        "trains exactly one (model.set_adapter(name))")
    for name, cfg in configs.items():
        kind = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None)))
        if kind != "LORA":
            problems.append(f"adapter {name!r} is a {kind} adapter: a chain handles LoRA only (not LoHa, LoKr, IA3, "
                            "OFT, BOFT, VeRA, ...)")
            continue
        if getattr(cfg, "use_dora", False):
            problems.append(f"adapter {name!r} uses DoRA (use_dora=True): a chain cannot merge and restart DoRA's "
                            "magnitude vector; use plain LoRA")
        if getattr(cfg, "lora_bias", False):
            problems.append(f"adapter {name!r} trains a bias (lora_bias=True): a chain's links have no bias")
        init = getattr(cfg, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            problems.append(f"adapter {name!r}: init_lora_weights={init!r} changes the base weights, so the "
                            "original base is not there to export against; use init_lora_weights=True and the "
                            "chain's own reinit (e.g. reinit='pissa')")
        for field in ("target_parameters", "trainable_token_indices"):
            if getattr(cfg, field, None):
                problems.append(f"adapter {name!r} sets {field}: a chain adapts nn.Linear layers only")
    if not record_links:
        problems.append("record_links=False: a chain on a PeftModel needs its links to give the PeftModel one "
                        "adapter holding the whole chain at the end")
    return problems


def _layer_problems(root: nn.Module, adapter: str) -> tuple[dict[str, nn.Module], list[str]]:
    """PEFT's LoRA layers of ``adapter`` under ``root`` by module name, and what is wrong with any of them."""
    from peft.tuners.lora.layer import Linear as PeftLinear, LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers, problems, odd = {}, [], {}
    for name, module in root.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer):
            odd.setdefault(f"{type(module).__module__}.{type(module).__name__} (not LoRA)", name)
            continue
        if adapter not in getattr(module, "lora_A", {}) and adapter not in getattr(module, "lora_embedding_A", {}):
            continue
        base = module.get_base_layer()
        if type(module) is not PeftLinear or not is_adaptable(base):
            what = f"{type(module).__module__}.{type(module).__name__} over {type(base).__name__}"
            odd.setdefault(what, name)
            continue
        weight = getattr(base, "weight", None)
        if weight is None or not weight.is_floating_point() or type(weight).__name__ in ("Params4bit", "Int8Params"):
            odd.setdefault(f"quantized base layer {type(base).__name__} ({getattr(weight, 'dtype', None)})", name)
            continue
        if bool(getattr(module, "fan_in_fan_out", False)) != is_conv1d(base):   # PEFT's flag must say the layout
            odd.setdefault(f"fan_in_fan_out={getattr(module, 'fan_in_fan_out', False)} over "
                           f"{type(base).__name__} (the flag does not match the weight's layout)", name)
            continue
        if module.lora_variant.get(adapter) is not None:
            odd.setdefault(f"LoRA variant {type(module.lora_variant[adapter]).__name__}", name)
            continue
        if module.merged:
            problems.append(f"{name}: the adapter is merged into the base weight; unmerge it first (model.unmerge_adapter())")
        if module.disable_adapters:
            problems.append(f"{name}: the adapters are disabled; enable them first")
        layers[name] = module
    for what, name in odd.items():
        problems.append(f"{what} (e.g. {name}): a chain handles PEFT's plain LoRA Linear over an unquantized "
                        "nn.Linear or Conv1D only")
    if not layers and not problems:
        problems.append(f"the PeftModel has no LoRA Linear layer of adapter {adapter!r}")
    return layers, problems


@dataclass
class _Adapted:
    """One converted layer: PEFT's layer (out of the model while the chain trains), the cola layer in its
    place, where it sits, and the base weight as it was before the first knot (host memory)."""

    peft_layer: nn.Module
    cola: LoRALinear
    parent: nn.Module
    child: str
    original: torch.Tensor
    trainable: bool


def _cola_layer(peft_layer, adapter: str) -> LoRALinear:
    """A :class:`LoRALinear` over PEFT's base layer holding PEFT's factor Parameters, dropout and scaling."""
    A, B = peft_layer.lora_A[adapter].weight, peft_layer.lora_B[adapter].weight
    r, rslora = A.shape[0], bool(peft_layer.use_rslora.get(adapter, False))
    alpha = float(peft_layer.scaling[adapter]) * (math.sqrt(r) if rslora else r)  # what PEFT applies now
    layer = LoRALinear(peft_layer.base_layer, r, alpha, 0.0, rslora, A.dtype)
    layer.lora_A, layer.lora_B = A, B         # the same Parameters: an optimizer over them stays attached
    layer.dropout = peft_layer.lora_dropout[adapter]
    return layer


def _convert(root: nn.Module, adapter: str, record_links: bool) -> dict[str, _Adapted]:
    """Swap each PEFT LoRA layer of ``adapter`` under ``root`` for a cola layer (checked first, all at once)."""
    peft_layers, problems = _layer_problems(root, adapter)
    cola_layers = {}
    for name, module in peft_layers.items():
        try:
            cola_layers[name] = _cola_layer(module, adapter)
        except ConfigError as err:
            problems += [f"{name}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems)
    adapted = {}
    for name, module in peft_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        layer = cola_layers[name]
        layer.record_links = record_links
        original = module.base_layer.weight.detach().to("cpu", copy=True)
        adapted[name] = _Adapted(module, layer, parent, child, original, bool(layer.lora_A.requires_grad))
        setattr(parent, child, layer)
        _FIRST_LINK.add(layer)
    return adapted


# ---------------------------------------------------------------------------- the bridge
class PeftBridge:
    """A PeftModel converted for a chain, and the way back (see the module's docstring).

    Built by :func:`attach` (which :class:`cola.Chain` and ``ColaCallback`` call); ``layers`` maps each
    cola layer's name in the PeftModel to its conversion record.
    """

    def __init__(self, model: nn.Module, record_links: bool = True):
        problems = _config_problems(model, record_links)
        if problems:
            raise ConfigError(problems)
        self.model = model
        self.adapter: str = list(model.active_adapters)[0]
        self.config = model.peft_config[self.adapter]
        adapted = _convert(model, self.adapter, record_links)
        self.layers: dict[str, _Adapted] = adapted
        self.finished = False
        log.info("PeftModel adapter %r: %d LoRA layers converted for the chain (ranks %s)", self.adapter,
                 len(adapted), sorted({a.cola.rank for a in adapted.values()}))

    # the names PEFT uses: relative to the inner model (adapter keys, rank_pattern)
    @staticmethod
    def _relative(name: str) -> str:
        return name[len(_PREFIX):] if name.startswith(_PREFIX) else name

    def _chain_adapter(self, chain) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Any]:
        """Per layer, the whole chain as PEFT's ``(A, B)`` for a rank-R adapter at PEFT's own scaling, and the
        LoraConfig that makes PEFT apply exactly that scaling when it loads them."""
        if self.finished:
            raise ConfigError("the chain's PeftModel was already given back (cola.to_peft): nothing more to export")
        ranks, factors = {}, {}
        for name, a in self.layers.items():
            if chain.layers.get(name) is not a.cola:
                raise ConfigError(f"{name}: the chain does not train this PeftModel's layer")
            B, A = stacked_factors(a.cola)
            R = A.shape[0]
            alpha = a.peft_layer.lora_alpha[self.adapter]
            scale = alpha / (math.sqrt(R) if a.peft_layer.use_rslora.get(self.adapter, False) else R)
            factors[name] = (A, B / scale)   # PEFT multiplies by its scaling: B @ A comes out at scale 1
            ranks[name] = R
        counts = Counter(ranks.values())
        r = max(counts, key=lambda k: (counts[k], -k))   # the most common total rank (the smaller on a tie)
        config = copy.deepcopy(self.config)
        config.r = r
        config.rank_pattern = {re.escape(self._relative(n)): k for n, k in ranks.items() if k != r}
        return factors, config

    def _install_peft(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config) -> None:
        """PEFT's layers back in place, each holding its part of ``factors``; the PeftModel's config set to ``config``."""
        for name, a in self.layers.items():
            A, B = factors[name]
            layer, old_A = a.peft_layer, a.peft_layer.lora_A[self.adapter].weight
            R = A.shape[0]
            new_A = nn.Linear(layer.in_features, R, bias=False, device=old_A.device, dtype=old_A.dtype)
            new_B = nn.Linear(R, layer.out_features, bias=False, device=old_A.device, dtype=old_A.dtype)
            with torch.no_grad():
                new_A.weight.copy_(A)
                new_B.weight.copy_(B)
            new_A.weight.requires_grad_(a.trainable)
            new_B.weight.requires_grad_(a.trainable)
            layer.lora_A[self.adapter], layer.lora_B[self.adapter] = new_A, new_B
            layer.r[self.adapter] = R
            alpha = layer.lora_alpha[self.adapter]
            layer.scaling[self.adapter] = alpha / (math.sqrt(R) if layer.use_rslora.get(self.adapter, False) else R)
            setattr(a.parent, a.child, layer)
        self.model.peft_config[self.adapter] = config

    def _install_cola(self, config) -> None:
        for a in self.layers.values():
            setattr(a.parent, a.child, a.cola)
        self.model.peft_config[self.adapter] = config

    @contextlib.contextmanager
    def peft_form(self, chain) -> Iterator[nn.Module]:
        """For a moment (writing a checkpoint), PEFT's layers holding the whole chain, over the *merged* base
        weights: what PEFT writes is right, but the model's function is not: run nothing through it."""
        factors, config = self._chain_adapter(chain)
        before = self.model.peft_config[self.adapter]
        self._install_peft(factors, config)
        try:
            yield self.model
        finally:
            self._install_cola(before)

    def save_adapter(self, chain, folder: str | os.PathLike, **save_kwargs: Any) -> Path:
        """Write the whole chain as this PeftModel's adapter into ``folder`` (a Trainer checkpoint, say), over
        the original base, without changing the live model. PEFT writes it into a temporary folder beside;
        each file then replaces the one of the same name (``adapter_model.safetensors``,
        ``adapter_config.json``), so a file is always either PEFT's mid-chain one or the chain's, never half."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".cola-adapter-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with self.peft_form(chain):
                self.model.save_pretrained(str(tmp), selected_adapters=[self.adapter], **save_kwargs)
            written = tmp / self.adapter if self.adapter != "default" and (tmp / self.adapter).is_dir() else tmp
            target = folder / self.adapter if written is not tmp else folder
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted(written.iterdir()):
                if file.is_file():
                    os.replace(file, target / file.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @torch.no_grad()
    def finish(self, chain) -> nn.Module:
        """The PeftModel made a correct PEFT model again, for good: original base weights, PEFT's layers, one
        adapter holding the whole chain. The chain's own layers leave the model: it cannot step any more."""
        factors, config = self._chain_adapter(chain)
        for a in self.layers.values():
            weight = a.peft_layer.base_layer.weight
            weight.copy_(a.original.to(weight.device))
            a.cola.residual = None
        self._install_peft(factors, config)
        self.finished = True
        _BRIDGES.pop(self.model, None)
        ranks = sorted({A.shape[0] for A, _ in factors.values()})
        log.info("PeftModel adapter %r holds the whole chain again (rank %s over the original base)", self.adapter,
                 ranks[0] if len(ranks) == 1 else ranks)
        return self.model


# ---------------------------------------------------------------------------- entry points
def bridge_of(model: nn.Module) -> PeftBridge | None:
    """The live bridge of ``model`` (converted and not finished), if any."""
    bridge = _BRIDGES.get(model)
    return bridge if bridge is not None and not bridge.finished else None


def attach(model: nn.Module, record_links: bool = True) -> PeftBridge | None:
    """For a PeftModel: its bridge, converting it the first time (see the module's docstring); ``None`` for any
    other model. A model that holds PEFT layers without being a PeftModel is refused."""
    if not is_peft_model(model):
        if _has_peft_layers(model):
            raise ConfigError(f"{type(model).__name__} holds PEFT tuner layers but is not a peft.PeftModel: pass the "
                              "PeftModel itself (peft.get_peft_model(...) or PeftModel.from_pretrained(...))")
        return None
    bridge = bridge_of(model)
    if bridge is None:
        bridge = PeftBridge(model, record_links)
        _BRIDGES[model] = bridge
    elif not record_links:
        raise ConfigError(_config_problems(model, record_links)[-1])
    return bridge


def to_peft(chain) -> nn.Module:
    """Give a chain's PeftModel back as a correct PEFT model (see :meth:`PeftBridge.finish`) and return it:
    ``model.save_pretrained(folder)`` then writes an adapter that ``PeftModel.from_pretrained(original_base,
    folder)`` turns into the trained model. Call it once, when training is over."""
    bridge = getattr(chain, "peft", None)
    if bridge is None:
        raise ConfigError("the chain was not built on a peft.PeftModel; export it with "
                          "cola.export.save_peft_adapter(chain, folder)")
    return bridge.finish(chain)


@dataclass(frozen=True)
class AdapterLayer:
    """One layer of an adapter taken out of a PeftModel: factors (``A`` r x in, ``B`` out x r) and scaling."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool
    dropout: float


def take_adapter(model: nn.Module) -> tuple[nn.Module, dict[str, AdapterLayer]]:
    """A PeftModel's base model with PEFT's layers taken out (its weights untouched: the original base), and
    its adapter's layers by module name in that base, for :func:`put_adapter` (``cola train`` keeps the base
    between runs and gives each run the adapter again as its chain's first link)."""
    problems = _config_problems(model, True)
    if any(getattr(cfg, "modules_to_save", None) for cfg in model.peft_config.values()):
        problems.append("modules_to_save: a chain trains the LoRA layers only")
    if problems:
        raise ConfigError(problems)
    adapter = list(model.active_adapters)[0]
    inner = model.base_model.model
    peft_layers, problems = _layer_problems(inner, adapter)
    if problems:
        raise ConfigError(problems)
    taken = {}
    for name, layer in peft_layers.items():
        cola_layer = _cola_layer(layer, adapter)
        taken[name] = AdapterLayer(cola_layer.lora_A.detach().clone(), cola_layer.lora_B.detach().clone(),
                                   cola_layer.alpha, cola_layer.rslora, float(getattr(cola_layer.dropout, "p", 0.0)))
    return model.unload(), taken


def put_adapter(model: nn.Module, layers: dict[str, AdapterLayer]) -> list[str]:
    """:class:`cola.LoRALinear` layers holding ``layers``' factors (copies) on ``model``, which the next chain
    keeps as its first link; everything else is frozen, as :func:`cola.inject_lora` leaves it."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("model already has LoRA layers: put the adapter on the plain base model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRALinear(base, spec.A.shape[0], spec.alpha, spec.dropout, spec.rslora, spec.A.dtype)
        layer.set_factors_(spec.A.to(base.weight.device), spec.B.to(base.weight.device))
        setattr(parent, child, layer)
        _FIRST_LINK.add(layer)
    return list(layers)
