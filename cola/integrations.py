"""COLA for transformers' ``Trainer`` (and TRL's trainers, which are Trainers) in one line.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ColaCallback(links=3, rank=8, alpha=16)])

At the end of ``Trainer.__init__`` the callback puts LoRA on the model (family defaults, or
``target_modules``) unless it already has LoRA layers, so the Trainer's optimizer is built over
the LoRA parameters only. At ``on_train_begin`` it builds a :class:`cola.Chain` over that
optimizer with ``total_steps = state.max_steps``; after every optimizer step it counts the step
and ties knots. The Trainer keeps its own LR scheduler; the chain's LR policy multiplies it around
each optimizer step. With each Trainer checkpoint the chain's state is saved as
``cola_chain.pt`` beside it, and loaded again when training resumes from that checkpoint. Each
knot's metrics (``cola/knot/link``, ``.../norm_mean``, ``.../seconds``, ``.../new_rank``, the
diagnostics' layer means) join the Trainer's log event of that step, so its own ``report_to``
(TensorBoard, W&B, trackio, ...) and ``state.log_history`` show them.

A ``peft.PeftModel`` (``get_peft_model(model, LoraConfig(...))``, or the one TRL's
``SFTTrainer(peft_config=...)`` builds) keeps its LoraConfig: at ``on_init_end`` its LoRA layers
are converted for the chain (:mod:`cola.peft_models`; ``rank``, ``alpha``, ``target_modules`` of
the callback are not used) and its adapter is the first link. Every checkpoint's
``adapter_model.safetensors`` / ``adapter_config.json`` are then rewritten at ``on_save`` to hold
the whole chain so far over the *original* base (what PEFT wrote a moment before was the live link
over the merged base), and at ``on_train_end`` the model is a correct PeftModel again (original
base weights, one adapter holding the whole chain), so ``trainer.save_model()`` and
``model.save_pretrained`` write an adapter that ``PeftModel.from_pretrained(original_base, dir)``
turns into the trained model. ``load_best_model_at_end`` is refused for a PeftModel.

A second ``trainer.train()`` of the same Trainer is refused with what to do instead: a new Trainer on the saved
adapter (``PeftModel.from_pretrained(base, dir, is_trainable=True)``, whose adapter is the new chain's first
link), or for a bare model on ``cola.merge_and_unload(model)`` (the chain folded into its weights).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .chain import Chain
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ChainConfig
from .diagnostics import knot_metrics
from .errors import ConfigError
from .inject import inject_lora, lora_layers
from .peft_models import attach as attach_peft, is_peft_model, to_peft

log = logging.getLogger(__name__)

STATE_FILE = "cola_chain.pt"


class ColaCallback(TrainerCallback):
    """Chain of LoRA inside transformers' Trainer.

    Args:
        target_modules, rank, alpha, dropout, rslora: passed to :func:`cola.inject_lora` when the
            model has no LoRA layers yet.
        plugin_manager: defaults to :func:`cola.get_plugin_manager`.
        **chain: any :class:`cola.ChainConfig` field except ``total_steps`` (taken from the
            Trainer), e.g. ``links=3``, ``reinit="pissa"``, ``lr_policy="rewarm"``.
    """

    def __init__(self, target_modules: list[str] | None = None, rank: int = 8, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, plugin_manager=None, **chain: Any):
        known = {f.name for f in fields(ChainConfig)} - {"total_steps"}
        unknown = sorted(set(chain) - known)
        if unknown:
            raise ConfigError(f"ColaCallback: unknown chain settings {unknown}; allowed: {sorted(known)}")
        self.inject = dict(target_modules=target_modules, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        self.chain_settings = chain
        self.plugin_manager = plugin_manager
        self.chain: Chain | None = None
        self._ended = False   #: the chain of this callback's Trainer has ended (a second train() is refused)
        self._saved_lrs: list[float] | None = None
        self._knots_logged = 0
        self._pending: dict[str, float] = {}   #: the metrics of knots not yet in a log event

    def _report_first(self) -> None:
        """Move this callback in front of the Trainer's reporting integrations (TensorBoard, W&B, trackio,
        ...): the Trainer hands one ``logs`` dict to its callbacks in list order, and the integrations come
        before the user's callbacks, so the knot metrics this callback adds in ``on_log`` would reach them
        only at the next log event. The handler is the caller of ``on_init_end`` (transformers' public
        callback list, ``trainer.callback_handler.callbacks``); if it is not found, a warning says so."""
        from transformers.trainer_callback import CallbackHandler

        frame = inspect.currentframe()
        handler = None
        for _ in range(6):
            frame = frame.f_back if frame is not None else None
            candidate = frame.f_locals.get("self") if frame is not None else None
            if isinstance(candidate, CallbackHandler):
                handler = candidate
                break
        del frame
        if handler is None:
            log.warning("ColaCallback: the Trainer's callback list was not found; knot metrics reach the "
                        "report_to integrations one log event late")
            return
        callbacks = handler.callbacks
        reporters = [i for i, c in enumerate(callbacks) if type(c).__module__.startswith("transformers.integrations")]
        if reporters and callbacks.index(self) > reporters[0]:
            callbacks.remove(self)
            callbacks.insert(reporters[0], self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._report_first()
        self.chain, self._ended = None, False   # a new Trainer (this callback may be handed to another one)
        if model is not None and is_peft_model(model):   # before the Trainer builds its optimizer
            attach_peft(model, self.chain_settings.get("record_links", True))
            log.info("ColaCallback: a PeftModel, whose LoraConfig decides the ranks and targets")
        elif model is not None and not lora_layers(model):
            inject_lora(model, **self.inject)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None or model is None:
            raise ConfigError("ColaCallback needs the Trainer's model and optimizer at on_train_begin")
        if self._ended:
            raise ConfigError(self._second_train(model))
        if is_peft_model(model) and getattr(args, "load_best_model_at_end", False):
            raise ConfigError("ColaCallback: load_best_model_at_end with a PeftModel would load a checkpoint's "
                              "adapter (over the original base) into the merged chain; turn it off")
        if not lora_layers(model) and not is_peft_model(model):  # the model was swapped after Trainer.__init__
            raise ConfigError("ColaCallback: the model has no LoRA layers; pass the callback to the "
                              "Trainer's constructor (callbacks=[...]) so it can inject them first")
        config = ChainConfig(total_steps=state.max_steps, **self.chain_settings)
        self.chain = Chain(model, lambda params: optimizer, config, plugin_manager=self.plugin_manager)
        resumed = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step > 0 and resumed.is_file():
            self.chain.load_state_dict(load_checkpoint(resumed))
            log.info("COLA chain resumed from %s (link %d, step %d)", resumed, self.chain.link, self.chain.step_count)
        elif state.global_step > 0:   # a chain restarted at step 0 would tie its knots at the wrong steps
            raise ConfigError(f"ColaCallback: the Trainer resumes at step {state.global_step}, but {resumed} is not "
                              "there: resume from a checkpoint in this run's output_dir")
        self._knots_logged = len(self.chain.history)   # a resumed chain's knots were logged before

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.chain is None:
            return
        factor = self.chain.lr_multiplier()
        groups = self.chain.optimizer.param_groups
        self._saved_lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.chain is None or self._saved_lrs is None:
            return
        for g, lr in zip(self.chain.optimizer.param_groups, self._saved_lrs):
            g["lr"] = lr
        self._saved_lrs = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.chain is not None and not (self.chain.peft is not None and self.chain.peft.finished):
            loss = state.log_history[-1].get("loss") if state.log_history else None
            self.chain.advance(loss if isinstance(loss, (int, float)) else None)
            new = self.chain.history[self._knots_logged:]
            for report in new:   # into this step's log event (the Trainer logs it: should_log)
                self._pending.update({f"cola/{k}": v for k, v in knot_metrics(report).items()})
            self._knots_logged = len(self.chain.history)
            if new:
                control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        """A knot's metrics (``cola/knot/...``: link, norms of the folded update, seconds, new rank, the
        diagnostics' layer means) join the log event of its step: the Trainer's ``report_to``
        integrations, its printed logs and ``state.log_history`` show them."""
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_save(self, args, state, control, **kwargs):
        if self.chain is not None and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_checkpoint(folder / STATE_FILE, self.chain.state_dict())
            if self.chain.peft is not None and not self.chain.peft.finished:
                self.chain.peft.save_adapter(self.chain, folder)   # the whole chain, over the original base

    def on_train_end(self, args, state, control, **kwargs):
        self._ended = self.chain is not None
        if self.chain is not None and self.chain.peft is not None and not self.chain.peft.finished:
            to_peft(self.chain)   # a correct PeftModel again, for save_model() and the rest of the script

    @staticmethod
    def _second_train(model) -> str:
        """Why a second ``train()`` of the same Trainer cannot continue the chain, and what does."""
        if is_peft_model(model):
            return ("ColaCallback: a second trainer.train() cannot continue the chain: the first one ended it "
                    "(on_train_end gave the PeftModel back, one adapter holding the whole chain over the original "
                    "base) and this Trainer's optimizer holds the parameters it trained, so it would train nothing. "
                    "To continue: trainer.save_model(DIR), then a new Trainer on PeftModel.from_pretrained(base, DIR, "
                    "is_trainable=True) with ColaCallback(...): that adapter is its first link")
        return ("ColaCallback: a second trainer.train() cannot continue the chain: a new chain would re-initialise "
                "the LoRA factors the first one trained (its live link). To continue: cola.merge_and_unload(model) "
                "(the chain folded into the weights), then a new Trainer with ColaCallback(...)")
