"""The ``cola train`` loop as a library function: :func:`run_experiment`.

For each seed and each method (``lora``, ``cola``, ``full``) one *run*: fresh model, LoRA
injected (not for ``full``), AdamW, the chain ties its knots by itself; the validation split
is scored zero-shot and after every link (the COLA curve), the test split zero-shot and at the
end. Every method of a comparison sees the same data, seeds, batches and number of optimizer
steps. Results (``results.json``, ``results.csv``, ``results.md``, plots) and per-run outputs
(``runs/<method>-seed<k>/``: ``run.json``, the PEFT adapter of the whole chain, each link as
its own adapter, optionally the merged model) go to the output folder; see
:mod:`cola.llm.report`.

Resuming: each run writes an atomic checkpoint (the chain's ``state_dict`` with the LoRA
factors, merged weights, optimizer, strategies and RNG; the number of micro-batches consumed,
from which the data order follows; the loss and evaluation records so far) every
``checkpoint_every`` steps and at every knot. ``resume=True`` skips the runs that completed
and continues the others from their checkpoints; the result is the same as an uninterrupted
run (bit for bit on CPU with the same thread count).

Data-parallel (``torchrun --nproc_per_node N -m cola train ...`` or ``accelerate launch``): the
process group is started from the launcher's environment (:mod:`cola.distributed`: gloo on CPU,
nccl on GPU) and each rank trains on its own device (``cuda:LOCAL_RANK``). ``batch_size`` is the
*global* micro-batch: every rank draws the same global batches from the seed and trains on its
contiguous slice (losses weighted by the slice's share of examples, or of answer tokens for the
``lm`` loss), the LoRA gradients are averaged before each optimizer step, and the chain sees the
global mean loss, so the knots, the LR schedule and the re-inits are the same on every rank
(checked at every knot by :func:`cola.distributed.attach`) and the run follows, to float rounding,
the trajectory of one process with the same settings. Evaluation is sharded over the ranks and
gathered. Only rank 0 writes files and logs progress; the decisions that read the output folder
(resume, cached zero-shot scores, completed runs) are taken on rank 0 and broadcast. With
``fsdp`` the frozen base model is sharded with FSDP2 (a fresh model is loaded for each run, as a
sharded model cannot be restored), knots merge shard-locally, checkpoints hold the gathered state:
a checkpoint resumes on any number of ranks, sharded or not. Every rank needs the output folder
(one node, or a shared filesystem).

FLOPs (plan and results) are estimates, per token of a training example::

    forward   2 * (N + N_lora)          N: parameters of the transformer body (embedding lookups free)
    backward  2 * (N + N_lora)          gradients of the activations, through every layer
            + 2 * N_trainable           gradients of the trained weights only (N_lora, or N for full)

so about ``(4 N + 6 N_lora)`` per token for LoRA/COLA and ``6 N`` for full fine-tuning, plus the
LM head (``2 V d`` forward, as much backward, ``2 V d`` more for its weight when trained) only
at the positions that predict an answer token. Attention's sequence-squared terms, norms and
activations are left out (small for prompts of a few hundred tokens). An evaluation costs the
forward part only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cola
import cola.distributed as cd
from cola.errors import ColaError, ConfigError
from cola.llm.settings import TrainSettings

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, Any]]
"""``loader() -> (model, tokenizer)``: a fresh base model (and its tokenizer) each call."""

CHECKPOINT_VERSION = 1
RESULTS_VERSION = 1


class RunStopped(ColaError):
    """Raised inside a run when ``stop_after`` steps were taken; the checkpoint is written."""


# ============================================================================ data and task

def build_task(settings: TrainSettings):
    """The task of ``settings``: a built-in one, or ``custom`` from the template and answers."""
    from cola.llm.tasks import get_task, make_task

    if settings.task == "custom":
        return make_task(settings.template, settings.answers, name="custom",
                         label_field=settings.label_field or "label")
    task = get_task(settings.task)
    if settings.label_field and settings.label_field != task.label_field:
        from dataclasses import replace

        task = replace(task, label_field=settings.label_field)
    return task


def load_data(settings: TrainSettings, task, seed: int):
    """The splits of ``seed``: MeZO's protocol over the task's source or the given files."""
    from cola.llm import data

    if settings.train_file:
        train_pool = data.read_rows(Path(settings.train_file))
        data.check_rows(task, train_pool, settings.train_file)
        if settings.test_file:
            test_pool = data.read_rows(Path(settings.test_file))
            data.check_rows(task, test_pool, settings.test_file)
            return data.split_mezo(train_pool, test_pool, settings.n_train, settings.n_val, settings.n_test,
                                   seed, settings.test_seed)
        return data.split_single_pool(train_pool, settings.n_train, settings.n_val, settings.n_test, seed,
                                      settings.test_seed)
    return data.load_splits(task, settings.data_dir, settings.n_train, settings.n_val, settings.n_test, seed,
                            settings.test_seed)


def epoch_batches(encoded: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """The micro-batches of ``epoch``: a permutation drawn from ``(seed, epoch)`` alone.

    Because the order depends on nothing else, the data position of a resumed run is just the
    number of micro-batches consumed.
    """
    from cola.llm.objective import iterate_batches

    state = int(np.random.SeedSequence([seed, 0x5EED, epoch]).generate_state(1)[0])
    return iterate_batches(encoded, batch_size, torch.Generator().manual_seed(state))


# ============================================================================ models

def default_loader(settings: TrainSettings, device: torch.device | None = None, fsdp: bool = False) -> Loader:
    """Loads ``settings.model`` with :func:`cola.llm.load_model` on each call.

    ``device`` (a distributed run: this rank's device) replaces ``settings.device``. With ``fsdp``
    the model is loaded on the CPU, in the dtype ``device`` calls for, and FSDP moves each rank's
    shard to ``device``.
    """
    from cola.llm.models import load_model, resolve_dtype

    if fsdp and device is not None:
        dtype = resolve_dtype(settings.dtype, device)
        return lambda: load_model(settings.model, dtype, "cpu")
    return lambda: load_model(settings.model, settings.dtype, device if device is not None else settings.device)


def meta_model(settings: TrainSettings):
    """``settings.model``'s architecture on the meta device (no weights) and its tokenizer, for plans."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cola.llm.models import EMBEDDED_MODEL, embedded_model_dir, prepare_tokenizer

    source = embedded_model_dir() if settings.model == EMBEDDED_MODEL else settings.model
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ColaError(f"could not read model {settings.model!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, prepare_tokenizer(tokenizer)


def body_parameters(model) -> tuple[int, int, int]:
    """``(N, V, d)``: parameters outside the input embedding and LM head, vocabulary and head width."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = {id(embed)}
    if head is not None:
        excluded.add(id(head.weight))
    n_body = sum(n for i, n in seen.items() if i not in excluded)
    if head is not None:
        vocab, width = head.weight.shape
    else:
        vocab, width = embed.shape
    return n_body, int(vocab), int(width)


class ModelHost:
    """Holds the base model between runs and hands out a pristine copy for each.

    LoRA runs change only the wrapped layers' weights: their originals are kept on CPU and put
    back afterwards (no second copy of the model). A full fine-tuning run changes every weight:
    the model is reloaded for the next run.

    In a distributed run ``device`` is this rank's device: each model the loader returns is moved
    there. With ``fsdp`` :meth:`inject` also shards the model (FSDP2, LoRA factors replicated) and
    every run gets a freshly loaded model: a sharded model cannot be put back.
    """

    def __init__(self, loader: Loader, device: torch.device | None = None, fsdp: bool = False):
        self.loader = loader
        self.device = device
        self.fsdp = fsdp
        self.model = None
        self.tokenizer = None
        self._originals: dict[str, torch.Tensor] = {}
        self._stale = False

    def get(self):
        if self.model is None or self._stale:
            self.model = None
            self.model, tokenizer = self.loader()
            from cola.llm.models import prepare_tokenizer

            self.tokenizer = prepare_tokenizer(tokenizer)
            self._stale = False
            if self.device is not None and not self.fsdp:   # under FSDP the shards go to the device
                self.model.to(self.device)
        return self.model, self.tokenizer

    def inject(self, settings: TrainSettings) -> list[str]:
        model, _ = self.get()
        targets = settings.targets if settings.targets is not None else None
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        names = cola.inject_lora(model, targets, settings.rank, settings.alpha, settings.dropout,
                                 lora_dtype=torch.float32 if low else None)  # train A, B in fp32 (as PEFT does)
        if self.fsdp:
            shard_model(model)
        else:
            self._originals = {n: candidates[n].weight.detach().to("cpu", copy=True) for n in names}
        return names

    def sharded_base(self, settings: TrainSettings):
        """Under FSDP: the base model sharded, for zero-shot scoring. It gets zero LoRA factors
        (``B = 0``: the outputs are the base model's, bit for bit); call :meth:`restore` after."""
        self.inject(settings)
        return self.model, self.tokenizer

    def for_full(self):
        model, tokenizer = self.get()
        self._stale = True  # every weight will change
        for p in model.parameters():
            p.requires_grad_(True)
        return model, tokenizer

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a LoRA run: plain ``nn.Linear`` layers with their original weights, all frozen.
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


# ============================================================================ plan and FLOPs

def flops_per_example(tokens: float, positions: float, n_body: int, n_lora: int, n_trainable: int,
                      vocab: int, width: int, train_head: bool = False, backward: bool = True) -> float:
    """Estimated FLOPs of one example (see the module docstring for the formula)."""
    fwd = 2.0 * (n_body + n_lora) * tokens + 2.0 * vocab * width * positions
    if not backward:
        return fwd
    bwd = 2.0 * (n_body + n_lora) * tokens + 2.0 * n_trainable * tokens + 2.0 * vocab * width * positions
    if train_head:
        bwd += 2.0 * vocab * width * positions
    return fwd + bwd


def example_sizes(encoded: list, loss: str) -> tuple[float, float, float, float]:
    """Mean ``(training tokens, training LM-head positions, eval tokens, eval positions)`` per example.

    Single-token answers: one forward of the context scores every candidate; otherwise one
    sequence per candidate (training with ``lm`` loss: the gold answer only).
    """
    if not encoded:
        return 0.0, 0.0, 0.0, 0.0
    single = all(len(c) == 1 for e in encoded for c in e.candidates)
    if single:
        t = float(np.mean([len(e.context) for e in encoded]))
        return t, 1.0, t, 1.0
    ev_tokens = float(np.mean([sum(len(e.context) + len(c) for c in e.candidates) for e in encoded]))
    ev_pos = float(np.mean([sum(len(c) for c in e.candidates) for e in encoded]))
    if loss == "lm":
        tr_tokens = float(np.mean([len(e.context) + len(e.candidates[e.label]) for e in encoded]))
        tr_pos = float(np.mean([len(e.candidates[e.label]) for e in encoded]))
        return tr_tokens, tr_pos, ev_tokens, ev_pos
    return ev_tokens, ev_pos, ev_tokens, ev_pos


def lora_shapes(model, settings: TrainSettings) -> dict[str, tuple[int, int]]:
    """``name -> (in, out)`` of every layer LoRA would wrap; the patterns are checked by
    :func:`cola.inject_lora` (which is undone at once; it leaves every parameter frozen)."""
    names = cola.inject_lora(model, settings.targets, settings.rank, settings.alpha, settings.dropout)
    layers = cola.lora_layers(model)
    shapes = {n: (layers[n].in_features, layers[n].out_features) for n in names}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layers[name].base)
    return shapes


def method_plan(settings: TrainSettings, method: str, total_steps: int, seed: int,
                shapes: dict[str, tuple[int, int]], n_params: dict[str, int], sizes: tuple[float, ...],
                examples_per_step: int) -> dict[str, Any]:
    """Knots, rank and trainable parameters of each link, and the estimated training FLOPs."""
    n_body, vocab, width, n_all = n_params["body"], n_params["vocab"], n_params["width"], n_params["all"]
    tr_tokens, tr_pos = sizes[0], sizes[1]
    if method == "full":
        flops = flops_per_example(tr_tokens, tr_pos, n_body, 0, n_body, vocab, width, True) * examples_per_step
        return {"method": method, "links": 1, "knots": [], "ranks": [], "lr": settings.full_lr,
                "steps_per_link": [total_steps], "trainable_params": [n_all],
                "train_flops": [flops * total_steps], "chain": None}
    config = settings.chain_config(method, total_steps, seed)
    pm = cola.get_plugin_manager()
    problems = []
    strategies = {}
    for kind in cola.config.STRATEGY_KINDS:
        try:
            strategies[kind] = pm.create(kind, getattr(config, kind), config, config.options(kind))
        except ConfigError as err:
            problems += [f"{method}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems)
    planned = getattr(strategies["merge_policy"], "planned_knots", None)
    knots = planned() if planned is not None else None
    n_links = len(knots) + 1 if knots is not None else config.links
    ranks = [strategies["rank_schedule"].rank(k, settings.rank) for k in range(n_links)]
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1
           or any(r > min(i, o) for i, o in shapes.values())]
    if bad:
        raise ConfigError(f"{method}: rank schedule {config.rank_schedule!r} gives ranks {ranks}; each must be "
                          f"an integer in [1, {min(min(s) for s in shapes.values())}]")
    bounds = [0, *(knots or []), total_steps] if knots is not None else None
    steps_per_link = [b - a for a, b in zip(bounds, bounds[1:])] if bounds else None
    trainable = [sum(r * (i + o) for i, o in shapes.values()) for r in ranks]
    flops = None
    if steps_per_link is not None:
        flops = [flops_per_example(tr_tokens, tr_pos, n_body, t, t, vocab, width) * examples_per_step * s
                 for t, s in zip(trainable, steps_per_link)]
    return {"method": method, "links": n_links, "knots": knots, "ranks": ranks, "lr": settings.lr,
            "steps_per_link": steps_per_link, "trainable_params": trainable, "train_flops": flops,
            "chain": config.to_dict()}


# ============================================================================ distributed

def start_distributed(settings: TrainSettings) -> torch.device | None:
    """Under torchrun / ``accelerate launch`` with several ranks (or one rank and ``fsdp``): start
    the process group and return this rank's device; ``None`` for a plain single process.

    The backend is gloo when ``settings.device`` is ``cpu``, else :func:`cola.distributed.init`'s
    choice (nccl with CUDA, gloo without; ``$COLA_DIST_BACKEND`` overrides). ``device=cuda`` (or
    unset) means each rank's own GPU, ``cuda:LOCAL_RANK``; one named GPU (``cuda:1``) is refused
    with several ranks. Calling it again does nothing more.
    """
    env = cd.detect()
    if not env.launched or (env.world_size <= 1 and not settings.fsdp):
        return None
    from cola.llm.models import resolve_device

    requested = resolve_device(settings.device) if settings.device is not None else None
    if requested is not None and requested.type == "cuda" and requested.index is not None and env.world_size > 1:
        raise ConfigError(f"device={settings.device!r} names one GPU but {env.world_size} processes were launched: "
                          "leave --device unset or pass 'cuda' (each rank then uses cuda:LOCAL_RANK)")
    cd.init(backend="gloo" if requested is not None and requested.type == "cpu" else None)
    if requested is None:
        return cd.device()
    if requested.type == "cuda":
        return torch.device("cuda", cd.local_rank() % torch.cuda.device_count())
    return requested


def shard_model(model) -> None:
    """FSDP2 over ``model`` (LoRA injected; factors replicated), in place, and make
    :func:`as_forward` run FSDP's root hooks: the objective calls the decoder and the LM head
    directly, not ``model.forward``, so without them the root's own weights (embeddings, final
    norm, LM head) would stay sharded. A no-op without a process group."""
    cd.fsdp(model)
    if not cd.is_initialized():
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    model._cola_forward = _call
    register_fsdp_forward_method(model, "_cola_forward")


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def as_forward(model, fn: Callable[[], Any]) -> Any:
    """``fn()`` run as ``model``'s forward: under FSDP inside the root's pre- and post-forward hooks
    (all-gathering its weights, registering its backward hooks on the output), else a plain call."""
    wrapped = getattr(model, "_cola_forward", None)
    return fn() if wrapped is None else wrapped(fn)


def is_sharded(model) -> bool:
    """True when ``model`` was sharded by :func:`shard_model` (its forwards are collectives)."""
    return getattr(model, "_cola_forward", None) is not None


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only, its result (or its error) handed to every rank.

    The decisions that read the output folder (resume checks, completed runs, cached scores) are
    taken once, so that ranks cannot disagree and then wait on each other forever; rank 0's
    :class:`ConfigError` / :class:`ColaError` is raised on every rank. A plain call with one process.
    """
    if not cd.is_distributed():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error = None
    if cd.is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            problems = err.problems if isinstance(err, ConfigError) else [str(err)]
            box[0] = ("config" if isinstance(err, ConfigError) else "error", problems)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "config":
        raise ConfigError(value)
    if kind == "error":
        raise ColaError(f"rank 0 failed: {value[0]}")
    return value


def check_global_batches(settings: TrainSettings, n_train: dict[int, int], world: int) -> None:
    """Every micro-batch, the last of an epoch included, must give each of ``world`` ranks at least
    one example (a rank with an empty slice would have nothing to run its forward on)."""
    problems = []
    for seed, n in n_train.items():
        sizes = sorted({min(settings.batch_size, n)} | ({n % settings.batch_size} - {0}), reverse=True)
        small = [b for b in sizes if b < world]
        if small:
            problems.append(f"batch_size={settings.batch_size} (the global micro-batch) with {n} training examples "
                            f"(seed {seed}) gives micro-batches of {' and '.join(map(str, sizes))} examples, "
                            f"fewer than the {world} ranks: every rank needs at least one example of each; "
                            f"use batch_size >= {world} with n_train a multiple of it (or leaving a last batch "
                            f"of >= {world})")
    if problems:
        raise ConfigError(problems)


def _shares(batch, loss: str) -> float:
    """What a slice of a micro-batch weighs in its mean loss: examples, or gold-answer tokens (``lm``)."""
    if loss == "lm":
        return float(sum(len(ex.candidates[ex.label]) for ex in batch))
    return float(len(batch))


# ============================================================================ the experiment

@dataclass
class _Context:
    settings: TrainSettings
    out: Path
    task: Any
    host: ModelHost
    progress: bool
    n_params: dict[str, int]
    steps_left: list[int | None]  # stop_after budget of this invocation (a list to share it)


def run_experiment(settings: TrainSettings, loader: Loader | None = None, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate every (seed, method) of ``settings``; return the results.

    Args:
        settings: the run's :class:`TrainSettings` (automatic defaults are resolved here).
        loader: ``loader() -> (model, tokenizer)`` giving a fresh base model on each call;
            default: :func:`cola.llm.load_model` of ``settings.model``.
        progress: show tqdm progress bars (the CLI does; a library call logs instead).

    Returns:
        The results dict written to ``results.json`` (see :mod:`cola.llm.report`); with
        ``dry_run`` the plan only. ``results["status"]`` is ``"complete"``, or ``"stopped"``
        when ``stop_after`` ended the invocation early (continue with ``resume=True``).
    """
    from cola.llm import report

    started = time.time()
    settings = settings.resolved()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    task = build_task(settings)
    device = None if settings.dry_run else start_distributed(settings)
    world = cd.world_size() if device is not None else 1
    out = on_main(lambda: _output_dir(settings))  # a default name holds the time: rank 0's
    seeds, methods = settings.seeds, settings.methods

    # ---- plan (no weights needed)
    if settings.dry_run and loader is None:
        model, tokenizer = meta_model(settings)
    else:
        fsdp = settings.fsdp and device is not None
        if settings.fsdp and not fsdp and not settings.dry_run:
            log.warning("fsdp: this is a single process (not started by torchrun or accelerate launch): "
                        "the model is not sharded")
        host = ModelHost(loader or default_loader(settings, device, fsdp), device, fsdp)
        model, tokenizer = host.get()
    max_length = _max_length(settings, model, tokenizer)
    splits = {seed: load_data(settings, task, seed) for seed in seeds}
    from cola.llm.objective import encode_examples

    encoded_train = {seed: encode_examples(tokenizer, splits[seed].train, task, max_length) for seed in seeds}
    n_body, vocab, width = body_parameters(model)
    n_params = {"body": n_body, "vocab": vocab, "width": width,
                "all": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    shapes = lora_shapes(model, settings) if any(m != "full" for m in methods) else {}
    sizes = example_sizes(encoded_train[seeds[0]], settings.loss)
    n_train = len(splits[seeds[0]].train)
    total_steps = settings.total_steps(n_train)
    per_step = settings.batch_size * settings.grad_accum
    plan = {
        "model": {"name": settings.model, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None), "parameters": n_params["all"],
                  "body_parameters": n_body, "vocab": vocab, "hidden": width, "lora_layers": len(shapes),
                  "lora_targets": sorted({n.rsplit(".", 1)[-1] for n in shapes})},
        "task": task.name, "answers": list(task.answers), "splits": {str(s): splits[s].sizes() for s in seeds},
        "max_length": max_length, "tokens_per_example": sizes[0], "positions_per_example": sizes[1],
        "total_steps": total_steps, "examples_per_step": per_step,
        "epochs": total_steps * per_step / max(1, n_train),
        "methods": {m: method_plan(settings, m, total_steps, seeds[0], shapes, n_params, sizes, per_step)
                    for m in methods},
    }
    n_val, n_test = len(splits[seeds[0]].validation), len(splits[seeds[0]].test)
    eval_fwd = flops_per_example(sizes[2], sizes[3], n_body, 0, 0, vocab, width, backward=False)
    for m, p in plan["methods"].items():
        n_evals = (1 + p["links"]) if settings.eval_links else 0
        p["eval_flops"] = eval_fwd * (n_val * n_evals + 2 * n_test)
    if settings.dry_run:
        return {"dry_run": True, "settings": settings.to_dict(), "plan": plan, "flops_formula": FLOPS_FORMULA}
    if world > 1:
        check_global_batches(settings, {seed: len(splits[seed].train) for seed in seeds}, world)

    # ---- output folder, settings and resume checks
    on_main(lambda: _prepare_output(settings, out))
    log.info("output folder: %s", out)
    main = cd.is_main_process()
    ctx = _Context(settings, out, task, host, progress and main, n_params, [settings.stop_after])
    results: dict[str, Any] = {
        "version": RESULTS_VERSION, "cola_version": cola.__version__, "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else None, "output_dir": str(out),
        "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "settings": settings.to_dict(), "plan": plan, "flops_formula": FLOPS_FORMULA, "runs": [],
        "status": "complete",
    }
    if device is not None:
        import torch.distributed as dist

        results["distributed"] = {"world_size": world, "backend": dist.get_backend(), "device": str(device),
                                  "fsdp": host.fsdp, "launcher": cd.detect().launcher}
        log.info("data-parallel over %d ranks (%s, %s%s); global micro-batch %d, %s per rank", world,
                 results["distributed"]["backend"], device.type, ", FSDP" if host.fsdp else "",
                 settings.batch_size, "/".join(map(str, sorted(set(cd.shard_sizes(settings.batch_size, world)),
                                                              reverse=True))))
    zero_shot = _zero_shot(ctx, splits, max_length)
    results["zero_shot"] = {"test": zero_shot["test"],
                            "validation": {str(s): v for s, v in zero_shot["validation"].items()}}
    try:
        for seed in seeds:
            for method in methods:
                record = _run_one(ctx, method, seed, splits[seed], encoded_train[seed], total_steps, max_length,
                                  zero_shot, plan["methods"][method])
                results["runs"].append(record)
    except RunStopped as stop:
        results["status"] = "stopped"
        results["stopped"] = str(stop)
        log.info("%s; continue with --resume (output folder %s)", stop, out)
    results["nonfinite_steps"] = {f"{r['method']}-seed{r['seed']}": r.get("nonfinite_steps", 0)
                                  for r in results["runs"]}  # skipped steps (non-finite loss/gradient)
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    results["seconds"] = time.time() - started
    report.finalize(results)
    files = on_main(lambda: report.write_all(results, out, plots=settings.plots))  # written when any rank returns
    results.setdefault("files", dict(files))
    return results


FLOPS_FORMULA = ("per training token: forward 2*(N+N_lora) + backward 2*(N+N_lora) (activation gradients) "
                 "+ 2*N_trainable (weight gradients of trained parameters only), N = parameters outside the "
                 "embeddings; LM head 2*V*d forward and backward only at answer positions; attention's "
                 "sequence-squared terms left out; evaluation = forward only")


def _max_length(settings: TrainSettings, model, tokenizer) -> int | None:
    from cola.llm.objective import default_max_length

    if settings.max_length is not None:
        return settings.max_length
    return default_max_length(model, tokenizer)


def _output_dir(settings: TrainSettings) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir)
    name = settings.name or f"{'-'.join(settings.methods)}-{settings.task}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path("runs") / name


def _prepare_output(settings: TrainSettings, out: Path) -> None:
    saved_path = out / "settings.json"
    if settings.resume:
        if not saved_path.is_file():
            raise ConfigError(f"resume: {out} holds no run to resume (no settings.json)")
        saved = json.loads(saved_path.read_text())
        current = settings.to_dict()
        from cola.llm.settings import RUNTIME_FIELDS

        differing = [f"{k} (saved {saved.get(k)!r}, now {current[k]!r})" for k in current
                     if k not in RUNTIME_FIELDS and saved.get(k) != current[k]]
        if differing:
            raise ConfigError([f"resume: the settings differ from the run in {out}:"] + differing)
        return
    if saved_path.is_file():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    settings.save(saved_path)


def _evaluate(ctx: _Context, model, tokenizer, examples, max_length, what: str) -> dict[str, Any]:
    from cola.llm.objective import evaluate

    start = time.perf_counter()
    if cd.is_distributed():
        result = _evaluate_sharded(ctx, model, tokenizer, examples, max_length)
    else:
        result = as_forward(model, lambda: evaluate(model, tokenizer, ctx.task, examples, ctx.settings.eval_batch_size,
                                                    ctx.settings.eval_rule, max_length, progress=ctx.progress))
    result["seconds"] = time.perf_counter() - start
    log.info("%s: accuracy %.4f (rule %s; acc_mean %.4f, acc_sum %.4f, acc_norm %.4f; n=%d) in %.1f s", what,
             result["accuracy"], result["rule"], result["acc_mean"], result["acc_sum"], result["acc_norm"],
             result["n"], result["seconds"])
    return result


def _evaluate_sharded(ctx: _Context, model, tokenizer, examples, max_length) -> dict[str, Any]:
    """:func:`cola.llm.objective.evaluate` with the examples split over the ranks: each scores its
    contiguous slice (batched by length, as ``evaluate`` does), the scores are gathered, and every
    rank computes the same metrics from all of them. Under FSDP every rank runs the same number of
    forwards (a rank with one batch fewer runs a filler batch), since each is a collective."""
    import torch.distributed as dist

    from cola.llm.objective import CandidateScores, candidate_scores, encode_examples, metrics

    settings, task = ctx.settings, ctx.task
    if not examples:
        raise ConfigError(f"{task.name}: no examples to evaluate")
    encoded = encode_examples(tokenizer, examples, task, max_length)
    mine = sorted(cd.shard(list(range(len(encoded)))), key=lambda i: len(encoded[i].context), reverse=True)
    size = settings.eval_batch_size
    n_batches = math.ceil(max(cd.shard_sizes(len(encoded))) / size)
    pad = tokenizer.pad_token_id or 0
    sharded = is_sharded(model)
    parts = []

    def score() -> None:
        for b in range(n_batches):
            index = mine[b * size:(b + 1) * size]
            if index:
                s = candidate_scores(model, [encoded[i] for i in index], pad)
                parts.append((index, s.logprob_sum.float().cpu(), s.n_tokens.float().cpu()))
            elif sharded:
                candidate_scores(model, encoded[:1], pad)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            as_forward(model, score)
    finally:
        model.train(was_training)
    gathered: list[Any] = [None] * cd.world_size()
    dist.all_gather_object(gathered, parts)
    n_cand = len(encoded[0].candidates)
    sums, counts = torch.zeros(len(encoded), n_cand), torch.zeros(len(encoded), n_cand)
    for rank_parts in gathered:
        for index, s, n in rank_parts:
            sums[index], counts[index] = s, n
    return metrics(CandidateScores(sums, counts), encoded, task, settings.eval_rule)


def _zero_shot(ctx: _Context, splits, max_length) -> dict[str, Any]:
    """Zero-shot scores of the base model: test once (the same for every seed), validation per seed.

    Under FSDP the base model is scored sharded (:meth:`ModelHost.sharded_base`), then reloaded."""
    path = ctx.out / "zero_shot.json"
    cached = on_main(lambda: json.loads(path.read_text()) if path.is_file() else {"test": None, "validation": {}})
    seeds = list(splits)
    missing = cached["test"] is None or (ctx.settings.eval_links
                                         and any(str(seed) not in cached["validation"] for seed in seeds))
    if not missing:
        return {"test": cached["test"], "validation": {int(s): v for s, v in cached["validation"].items()}}
    model, tokenizer = ctx.host.sharded_base(ctx.settings) if ctx.host.fsdp else ctx.host.get()
    write = cd.is_main_process()
    if cached["test"] is None:
        cached["test"] = _evaluate(ctx, model, tokenizer, splits[seeds[0]].test, max_length, "zero-shot test")
        if write:
            _write_json(path, cached)
    if ctx.settings.eval_links:
        for seed in seeds:
            if str(seed) not in cached["validation"]:
                cached["validation"][str(seed)] = _evaluate(ctx, model, tokenizer, splits[seed].validation,
                                                            max_length, f"zero-shot validation (seed {seed})")
                if write:
                    _write_json(path, cached)
    if ctx.host.fsdp:
        ctx.host.restore()
    return {"test": cached["test"], "validation": {int(s): v for s, v in cached["validation"].items()}}


# ============================================================================ one run

def _run_one(ctx: _Context, method: str, seed: int, splits, encoded, total_steps: int, max_length,
             zero_shot, plan: dict[str, Any]) -> dict[str, Any]:
    settings = ctx.settings
    key = f"{method}-seed{seed}"
    run_dir = ctx.out / "runs" / key
    record_path = run_dir / "run.json"
    main = cd.is_main_process()

    def completed() -> dict[str, Any] | None:
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record.get("status") == "complete":
                return record
        run_dir.mkdir(parents=True, exist_ok=True)
        return None

    done = on_main(completed)  # rank 0 reads and decides; every rank follows
    if done is not None:
        log.info("%s: already complete, skipped", key)
        return done
    ckpt_path = run_dir / "checkpoint.pt"
    start = time.perf_counter()
    if ctx.host.fsdp:
        ctx.host.get()  # a fresh model for each run, loaded before the seed: LoRA draws as without FSDP
    torch.manual_seed(seed)
    chain = optimizer = scheduler = None
    if method == "full":
        model, tokenizer = ctx.host.for_full()
        params = [p for p in {id(p): p for p in model.parameters()}.values()]
        optimizer = torch.optim.AdamW(params, lr=settings.full_lr, weight_decay=settings.weight_decay)
        cfg = settings.chain_config("lora", total_steps, seed)  # for its base LR schedule only
        from cola.config import schedule_multiplier

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda taken: schedule_multiplier(cfg.lr_schedule, taken, total_steps, cfg.warmup_steps))
        trainable = sum(p.numel() for p in params)
    else:
        ctx.host.inject(settings)
        model, tokenizer = ctx.host.get()
        config = settings.chain_config(method, total_steps, seed)
        chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=settings.lr, weight_decay=settings.weight_decay),
                           config)
        cd.attach(chain)  # ranks start alike (checked) and stay alike: every knot checked (a no-op for one process)
        trainable = sum(p.numel() for p in chain.params)
    record: dict[str, Any] = {
        "method": method, "seed": seed, "status": "running", "total_steps": total_steps,
        "chain_config": chain.config.to_dict() if chain else None,
        "knots": chain.planned_knots() if chain else [], "ranks": chain.planned_ranks() if chain else [],
        "trainable_params": trainable, "trainable_params_per_link": plan["trainable_params"],
        "lr": settings.full_lr if method == "full" else settings.lr,
        "data": splits.sizes(), "train_loss": [], "lr_per_step": [], "curve": [], "knot_reports": [],
        "seconds": {"train": 0.0, "eval": 0.0, "export": 0.0}, "position": 0, "nonfinite_steps": 0,
    }
    if settings.eval_links:
        record["curve"].append({"after_link": 0, "step": 0, "validation": zero_shot["validation"][seed]})
    if settings.resume and on_main(ckpt_path.is_file):
        state = _load_checkpoint_everywhere(ckpt_path, key)
        _check_checkpoint(state, key)
        if chain is not None:
            chain.load_state_dict(state["chain"])
        else:
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        record = state["record"]
        record["nonfinite_in_row"] = 0  # a resumed run gets a fresh max_nonfinite_in_row budget (as the chain does)
        log.info("%s: resumed at step %d of %d", key, _steps_taken(chain, record), total_steps)
    try:
        _train(ctx, key, model, tokenizer, chain, optimizer, scheduler, encoded, splits, record, total_steps,
               seed, max_length, ckpt_path)
    except BaseException:
        ctx.host.restore()
        raise
    # ---- final evaluation
    t0 = time.perf_counter()
    if settings.eval_links:
        links_done = (len(chain.history) + 1) if chain else 1
        val = _evaluate(ctx, model, tokenizer, splits.validation, max_length, f"{key} validation after link {links_done}")
        record["curve"].append({"after_link": links_done, "step": total_steps, "validation": val})
    record["test"] = _evaluate(ctx, model, tokenizer, splits.test, max_length, f"{key} test")
    record["zero_shot"] = {"test": zero_shot["test"], "validation": zero_shot["validation"].get(seed)}
    record["seconds"]["eval"] += time.perf_counter() - t0
    # ---- outputs
    t0 = time.perf_counter()
    record["outputs"] = _save_outputs(ctx, run_dir, model, tokenizer, chain, method)
    record["seconds"]["export"] = time.perf_counter() - t0
    record = on_main(lambda: record)  # rank 0's timings and output paths on every rank
    if chain is not None:
        record["knot_reports"] = [r.to_dict() for r in chain.history]
        record["nonfinite_steps"] = chain.nonfinite_steps
    record["status"] = "complete"
    record["seconds"]["total"] = sum(v for k, v in record["seconds"].items() if k != "total")
    record["flops"] = {"train": plan["train_flops"], "eval_estimate": plan.get("eval_flops")}
    if settings.keep_checkpoints:
        _save_checkpoint(ckpt_path, key, chain, model, optimizer, scheduler, record)
        record["outputs"]["checkpoint"] = str(ckpt_path)
    elif main:
        ckpt_path.unlink(missing_ok=True)
    if main:
        _write_json(record_path, record)
    ctx.host.restore()
    log.info("%s: test accuracy %.4f (zero-shot %.4f) in %.0f s", key, record["test"]["accuracy"],
             zero_shot["test"]["accuracy"], time.perf_counter() - start)
    return record


def _steps_taken(chain, record) -> int:
    return chain.step_count if chain is not None else len(record["train_loss"])


def _train(ctx: _Context, key: str, model, tokenizer, chain, optimizer, scheduler, encoded, splits, record,
           total_steps: int, seed: int, max_length, ckpt_path: Path) -> None:
    from cola.llm.objective import training_loss

    settings = ctx.settings
    pad = tokenizer.pad_token_id or 0
    per_epoch = math.ceil(len(encoded) / settings.batch_size)
    batches_epoch, batches = -1, []
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=_steps_taken(chain, record), desc=f"training {key}", unit="step",
                   dynamic_ncols=True)
    knots_seen = len(chain.history) if chain else 0
    distributed = cd.is_distributed()
    model.train()
    tic = time.perf_counter()
    try:
        while _steps_taken(chain, record) < total_steps:
            if ctx.steps_left[0] is not None and ctx.steps_left[0] <= 0:  # spent on an earlier run
                raise RunStopped(f"{key}: stopped before step {_steps_taken(chain, record) + 1} of {total_steps} "
                                 "(stop_after)")
            loss_total = 0.0
            for _ in range(settings.grad_accum):
                epoch, index = divmod(record["position"], per_epoch)  # position: global micro-batches consumed
                if epoch != batches_epoch:
                    batches, batches_epoch = epoch_batches(encoded, settings.batch_size, seed, epoch), epoch
                if distributed:  # this rank's slice of the global micro-batch, weighted by its share of it
                    batch = batches[index]
                    mine = cd.shard(batch)
                    scale = cd.loss_scale(_shares(mine, settings.loss), _shares(batch, settings.loss))
                    loss = as_forward(model, lambda: training_loss(model, mine, settings.loss, pad))
                    loss = loss * scale / settings.grad_accum
                else:
                    loss = as_forward(model, lambda: training_loss(model, batches[index], settings.loss, pad))
                    loss = loss / settings.grad_accum
                loss.backward()
                loss_total += float(loss.detach())
                record["position"] += 1
            if distributed:
                cd.sync_gradients(chain if chain is not None else model)  # the mean over the global batch
                loss_total = cd.average(loss_total)                       # the same loss on every rank
            lr_now = _current_lr(chain, optimizer, settings)
            if chain is not None:
                took = chain.step(loss_total)
                chain.zero_grad()
                if not took:
                    record["nonfinite_steps"] = chain.nonfinite_steps
                    if chain.nonfinite_in_row >= settings.max_nonfinite_in_row:
                        _stop_nonfinite(ckpt_path, key, chain, model, optimizer, scheduler, record,
                                        chain.nonfinite_in_row, f"--lr (now {settings.lr})")
                    continue
            else:
                if not _finite_step(model, loss_total, record, key):
                    if record["nonfinite_in_row"] >= settings.max_nonfinite_in_row:
                        _stop_nonfinite(ckpt_path, key, chain, model, optimizer, scheduler, record,
                                        record["nonfinite_in_row"], f"--full-lr (now {settings.full_lr})")
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step = _steps_taken(chain, record) if chain is not None else len(record["train_loss"]) + 1
            record["train_loss"].append(loss_total)
            record["lr_per_step"].append(lr_now)
            elapsed = time.perf_counter() - tic
            tic = time.perf_counter()
            record["seconds"]["train"] += elapsed
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_total:.4f}", link=(chain.link if chain else 0))
            if step % settings.log_every == 0 or step == total_steps:
                recent = record["train_loss"][-settings.log_every:]
                log.info("%s step %d/%d link %d: loss %.4f (mean of last %d %.4f), lr %.3g", key, step, total_steps,
                         chain.link if chain else 0, loss_total, len(recent), float(np.mean(recent)), lr_now)
            knot = chain is not None and len(chain.history) > knots_seen
            if knot:
                knots_seen = len(chain.history)
                if settings.eval_links:
                    t0 = time.perf_counter()
                    val = _evaluate(ctx, model, tokenizer, splits.validation, max_length,
                                    f"{key} validation after link {knots_seen}")
                    record["curve"].append({"after_link": knots_seen, "step": step, "validation": val})
                    record["seconds"]["eval"] += time.perf_counter() - t0
                    model.train()
                    tic = time.perf_counter()
            budget = ctx.steps_left
            if budget[0] is not None:
                budget[0] -= 1
            stop = budget[0] is not None and budget[0] <= 0 and step < total_steps
            if step < total_steps and (knot or stop or (settings.checkpoint_every
                                                        and step % settings.checkpoint_every == 0)):
                _save_checkpoint(ckpt_path, key, chain, model, optimizer, scheduler, record)
                tic = time.perf_counter()
            if stop:
                raise RunStopped(f"{key}: stopped after step {step} of {total_steps} (stop_after)")
    finally:
        if bar is not None:
            bar.close()
    model.eval()


def _current_lr(chain, optimizer, settings: TrainSettings) -> float:
    if chain is not None:
        return chain.optimizer.param_groups[0]["lr"] * chain.lr_multiplier()
    return optimizer.param_groups[0]["lr"]


def _finite_step(model, loss: float, record, key: str) -> bool:
    """Full fine-tuning's version of the chain's non-finite guard (the caller stops the run)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    if finite:
        record["nonfinite_in_row"] = 0
        return True
    for p in model.parameters():
        p.grad = None
    record["nonfinite_steps"] += 1
    record["nonfinite_in_row"] = record.get("nonfinite_in_row", 0) + 1
    log.warning("%s: step skipped: non-finite loss or gradient (%d in a row)", key, record["nonfinite_in_row"])
    return False


def _stop_nonfinite(ckpt_path: Path, key: str, chain, model, optimizer, scheduler, record, in_row: int,
                    lr_hint: str) -> None:
    """``in_row`` non-finite steps in a row: checkpoint the last good state (with the data position
    past the bad batches) and end the run with a :class:`ColaError` naming both."""
    _save_checkpoint(ckpt_path, key, chain, model, optimizer, scheduler, record)
    good = _steps_taken(chain, record)
    raise ColaError(f"{key}: {in_row} steps in a row with a non-finite loss or gradient "
                    f"({record['nonfinite_steps']} skipped in all); stopped after the last good step {good}, "
                    f"checkpoint {ckpt_path}. Lower {lr_hint} or check the data, then continue with "
                    f"cola train --resume (max_nonfinite_in_row={in_row})")


def _save_checkpoint(path: Path, key: str, chain, model, optimizer, scheduler, record) -> None:
    """Rank 0 writes the checkpoint (every rank holds the same state), then every rank goes on.
    Under FSDP ``chain.state_dict()`` gathers the shards: a collective that every rank joins."""
    if not cd.is_main_process() and not is_sharded(model):
        cd.barrier()
        return
    state: dict[str, Any] = {"version": CHECKPOINT_VERSION, "key": key, "record": record}
    if chain is not None:
        state["chain"] = chain.state_dict()
    else:
        state["model"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
        state["rng"] = torch.get_rng_state()
    t0 = time.perf_counter()
    cd.save_on_main(path, state)
    log.debug("%s: checkpoint at step %d in %.2f s", key, len(record["train_loss"]), time.perf_counter() - t0)


def _load_checkpoint_everywhere(path: Path, key: str) -> dict[str, Any]:
    """Every rank reads the checkpoint rank 0 wrote (on any number of ranks); an error on any rank
    is raised on all of them."""
    state, error = None, None

    def unreadable(why) -> str:
        return (f"{key}: rank {cd.rank()} cannot read the checkpoint {path} that rank 0 sees ({why}): every rank "
                "needs the output folder (one node, or a filesystem shared by the nodes)")

    try:
        state = cola.load_checkpoint(path)
    except ColaError as err:
        if cd.is_distributed() and not path.is_file():
            error = unreadable("no such file")
        else:
            error = (f"{key}: cannot resume: {err}. Move the file away to restart this run from step 0 "
                     "(the other runs keep their progress)")
    except OSError as err:
        if not cd.is_distributed():
            raise
        error = unreadable(err)
    errors = [error]
    if cd.is_distributed():
        import torch.distributed as dist

        errors = [None] * cd.world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise ColaError(first) from None
    return state


def _check_checkpoint(state: dict[str, Any], key: str) -> None:
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or state.get("key") != key:
        raise ColaError(f"checkpoint of {key} is not one this version of cola train wrote "
                        f"(version {state.get('version') if isinstance(state, dict) else None}, "
                        f"run {state.get('key') if isinstance(state, dict) else None})")


def _save_outputs(ctx: _Context, run_dir: Path, model, tokenizer, chain, method: str) -> dict[str, Any]:
    """The PEFT adapter of the whole chain, each link's adapter, and (optionally) the merged model.

    Rank 0 writes them (the LoRA factors are replicated on every rank; every rank merges its own
    copy, so that all end with the same model). Under FSDP each rank merges into its shards and the
    merged weights are gathered to rank 0's CPU memory, one tensor at a time, to be written.
    """
    settings = ctx.settings
    outputs: dict[str, Any] = {}
    main = cd.is_main_process()
    if main and chain is not None and (settings.save_adapter or settings.save_links):
        try:
            from cola import export
        except ImportError as exc:
            export = None
            log.warning("adapters not saved: cola.export is not available (%s)", exc)
            outputs["adapter_error"] = f"cola.export not available: {exc}"
        if export is not None:
            base = _base_name(settings)
            if settings.save_adapter:
                outputs["adapter"] = str(export.save_peft_adapter(chain, run_dir / "adapter",
                                                                  base_model_name_or_path=base))
            if settings.save_links:
                outputs["links"] = str(export.save_link_adapters(chain, run_dir / "links",
                                                                 base_model_name_or_path=base))
    if settings.save_merged:
        merged = run_dir / "merged"
        if chain is not None:
            cola.merge_and_unload(model)
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            cd.reshard(model)   # an evaluation leaves the root unsharded; gather from the shards
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if main:
                model.save_pretrained(merged, state_dict=full)
            del full
        elif main:
            model.save_pretrained(merged)
        if main:
            tokenizer.save_pretrained(merged)
            outputs["merged"] = str(merged)
        cd.barrier()
    return outputs


def _base_name(settings: TrainSettings) -> str:
    from cola.llm.models import EMBEDDED_MODEL, embedded_model_dir

    return str(embedded_model_dir()) if settings.model == EMBEDDED_MODEL else settings.model


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the libraries a result depends on."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform(),
                                  "torch_threads": str(torch.get_num_threads())}
    for dist in ("chain-of-lora", "torch", "transformers", "peft", "numpy", "tokenizers", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out
