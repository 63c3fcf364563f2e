"""Where a run's model comes from: the loader, a pristine copy for each run, the meta-device plan model.

:class:`ModelHost` holds the base model between the runs of an experiment. A LoRA run changes
only the wrapped layers' weights: their originals are kept on CPU and put back afterwards, so no
second copy of the model is ever made. A full fine-tuning run changes every weight, and an FSDP
run shards the model: the next run then loads a fresh one.

A loader may give a ``peft.PeftModel`` (``--model`` a PEFT adapter folder does): the host keeps its
base (the original weights) and the adapter's factors apart (:func:`cola.peft_models.take_adapter`),
and each run's LoRA layers hold a copy of them, which the run's chain continues as its first link.
The adapter's LoraConfig, not ``--targets`` / ``--rank``, then decides where LoRA goes and its rank
(and the plan counts with them: :func:`plan_settings`); the zero-shot scores are the base's. Under FSDP the
same holds: the adapter's factors are put back before the base is sharded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import cola
from cola.errors import ColaError, ConfigError
from cola.llm.models import EMBEDDED_MODEL, embedded_model_dir, load_model, prepare_tokenizer, resolve_dtype
from cola.llm.parallel import shard_model
from cola.llm.performance import prepare_base, prepare_training
from cola.llm.settings import TrainSettings

Loader = Callable[[], tuple[Any, Any]]
"""``loader() -> (model, tokenizer)``: a fresh base model (and its tokenizer) each call."""


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a PEFT adapter folder (one with ``adapter_config.json``); ``None`` for anything else."""
    config = Path(name_or_path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown")
    return base


def plan_settings(settings: TrainSettings, adapter: dict[str, Any] | None = None) -> TrainSettings:
    """The settings a run's plan counts with: for ``--model`` a PEFT adapter folder, the adapter's own targets,
    rank and alpha (the chain continues it: ``--rank`` and ``--targets`` do not apply), from its layers once
    loaded (``adapter``, :meth:`ModelHost.get`) or else from its ``adapter_config.json``; otherwise ``settings``.
    An adapter whose layers have different ranks (a ``rank_pattern``) is counted at its largest."""
    if adapter:
        first = next(iter(adapter.values()))
        return settings.replace(targets=sorted(adapter), rank=max(a.A.shape[0] for a in adapter.values()),
                                alpha=float(first.alpha))
    path = Path(settings.model) / "adapter_config.json"
    if not path.is_file():
        return settings
    config = json.loads(path.read_text())
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else sorted(targets) if targets else settings.targets
    ranks = [config.get("r", settings.rank), *(config.get("rank_pattern") or {}).values()]
    return settings.replace(targets=targets, rank=int(max(ranks)), alpha=float(config.get("lora_alpha", settings.alpha)))


def load_adapter_model(folder: str, dtype=None, device=None, attn: str | None = None) -> tuple[Any, Any]:
    """A PEFT adapter folder as a trainable ``PeftModel`` over its base (:func:`cola.llm.load_model`); the
    tokenizer is the adapter folder's when it has one, else the base's."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model, tokenizer = load_model(adapter_base(folder), dtype, device, attn)
    if (Path(folder) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return PeftModel.from_pretrained(model, folder, is_trainable=True), tokenizer


def default_loader(settings: TrainSettings, device: torch.device | None = None, fsdp: bool = False) -> Loader:
    """Loads ``settings.model`` with :func:`cola.llm.load_model` on each call; a PEFT adapter folder (with
    ``adapter_config.json``) as a PeftModel over its base, whose adapter the chain continues as its first link.

    ``device`` (a distributed run: this rank's device) replaces ``settings.device``. With ``fsdp``
    the model is loaded on the CPU, in the dtype ``device`` calls for, and FSDP moves each rank's
    shard to ``device``: a PeftModel the same way, its adapter taken apart by :class:`ModelHost` and put
    back as the first link's factors (replicated) before the base is sharded, as a bare model's LoRA is.
    """
    attn = settings.attn_implementation
    load = load_adapter_model if adapter_base(settings.model) is not None else load_model
    if fsdp and device is not None:   # on the CPU; each rank's shard goes to the device (a PeftModel's too)
        dtype = resolve_dtype(settings.dtype, device)
        return lambda: load(settings.model, dtype, "cpu", attn)
    return lambda: load(settings.model, settings.dtype, device if device is not None else settings.device, attn)


def model_source(settings: TrainSettings) -> str:
    """What ``from_pretrained`` reads for ``settings.model``: the embedded model's cache folder, the base of a
    PEFT adapter folder, or the name."""
    if settings.model == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return adapter_base(settings.model) or settings.model


#: the meta-device models of this process, by source: the dry runs of a sweep's cells share one (a plan only reads
#: the model's shapes)
_META: dict[str, tuple[Any, Any]] = {}


def meta_model(settings: TrainSettings):
    """``settings.model``'s architecture on the meta device (no weights) and its tokenizer, for plans; built once
    per model in a process (the plan reads shapes only, so the same one serves every dry run)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = model_source(settings)
    if source not in _META:
        try:
            config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise ColaError(f"could not read model {settings.model!r}: {exc}") from exc
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        while len(_META) >= 2:
            _META.pop(next(iter(_META)))
        _META[source] = (model, prepare_tokenizer(tokenizer))
    return _META[source]


class ModelHost:
    """Holds the base model between runs and hands out a pristine copy for each.

    In a distributed run ``device`` is this rank's device: each model the loader returns is moved
    there. With ``fsdp`` :meth:`inject` also shards the model (FSDP2, LoRA factors replicated) and
    every run gets a freshly loaded model: a sharded model cannot be put back.

    With ``settings``, the performance settings apply (:mod:`cola.llm.performance`): each loaded model
    gets the attention kernel and gradient checkpointing (before LoRA and sharding), and each run's
    model is compiled once it is set up (:meth:`inject`, :meth:`for_full`).
    """

    def __init__(self, loader: Loader, device: torch.device | None = None, fsdp: bool = False,
                 settings: TrainSettings | None = None):
        self.loader = loader
        self.device = device
        self.fsdp = fsdp
        self.settings = settings
        self.model = None
        self.tokenizer = None
        self._originals: dict[str, torch.Tensor] = {}
        self._stale = False
        self.adapter: dict[str, Any] | None = None   # a PeftModel's adapter, each run's first link

    def get(self):
        """The base model and its tokenizer (loaded when there is none or the last one was changed)."""
        if self.model is None or self._stale:
            self.model = None
            self.model, tokenizer = self.loader()
            self.adapter = None
            if cola.peft_models.is_peft_model(self.model):   # the base model, and the adapter kept apart
                self.model, self.adapter = cola.peft_models.take_adapter(self.model)
            self.tokenizer = prepare_tokenizer(tokenizer)
            self._stale = False
            if self.settings is not None:
                prepare_base(self.model, self.settings)
            if self.device is not None and not self.fsdp:   # under FSDP the shards go to the device
                self.model.to(self.device)
        return self.model, self.tokenizer

    def inject(self, settings: TrainSettings, train: bool = True) -> list[str]:
        """LoRA on ``settings.targets`` (factors in float32 over a bf16/fp16 base, as PEFT does); for
        training (``train``) the model is then compiled when ``settings.compile`` asks for it."""
        model, _ = self.get()
        low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        if self.adapter is not None:   # the adapter's LoraConfig decides targets and ranks
            names = cola.peft_models.put_adapter(model, self.adapter)
        else:
            names = cola.inject_lora(model, settings.targets, settings.rank, settings.alpha, settings.dropout,
                                     lora_dtype=torch.float32 if low else None)
        if self.fsdp:
            shard_model(model)
        else:   # the wrapped layers' weights as stored (nn.Linear or Conv1D), put back by restore()
            layers = cola.lora_layers(model)
            self._originals = {n: layers[n].base.weight.detach().to("cpu", copy=True) for n in names}
        if train:
            prepare_training(model, settings)
        return names

    def sharded_base(self, settings: TrainSettings):
        """Under FSDP: the base model sharded, for zero-shot scoring. It gets zero LoRA factors
        (``B = 0``: the outputs are the base model's, bit for bit); call :meth:`restore` after."""
        self.inject(settings, train=False)
        return self.model, self.tokenizer

    def for_full(self):
        """The model with every weight trainable; it is reloaded for the next run."""
        model, tokenizer = self.get()
        self._stale = True  # every weight will change
        for p in model.parameters():
            p.requires_grad_(True)
        if self.settings is not None:
            prepare_training(model, self.settings)
        return model, tokenizer

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a LoRA run: plain ``nn.Linear`` / ``Conv1D`` layers with their original weights, all frozen.
        (Under FSDP the model is stale instead: the next :meth:`get` loads a fresh one.)"""
        if self.model is None or self._stale:
            return
        if self.fsdp:
            self._stale = True
            return
        for name, weight in self._originals.items():
            module = self.model.get_submodule(name)
            linear = module.base if isinstance(module, cola.LoRALinear) else module
            linear.weight.copy_(weight.to(linear.weight.device))
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, linear)
        self._originals = {}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
