"""The value checks of :class:`cola.llm.TrainSettings`: every problem of a run's settings, at once.

The settings class checks each field's type against its annotation; what is checked here is
what a type cannot say: allowed names (with the closest one suggested), ranges, fields that
exclude or need each other, the task's own needs, and the chain table (unknown keys, the
:class:`cola.ChainConfig` it makes, strategy names known to the plugin manager).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from cola.config import STRATEGY_KINDS, ChainConfig
from cola.errors import ConfigError, closest
from cola.llm.tasks.kinds import task_problems
from cola.llm.tracking import TRACKERS, tracker_problems
from cola.manager import get_plugin_manager

METHODS = ("lora", "cola", "full")
"""``lora``: one link; ``cola``: ``links`` links over the same steps; ``full``: every weight trained."""

LOSSES = ("classification", "lm")
RULES = ("mean", "sum", "norm")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
REPLAY_LOSSES = ("lm", "kl")
"""The replay loss: the replayed tokens' NLL, or the KL divergence from the starting model's distributions."""

#: [chain] keys the run sets itself (from steps/epochs, seeds and method/links)
CHAIN_DERIVED = ("total_steps", "seed")
CHAIN_KEYS = tuple(f.name for f in fields(ChainConfig) if f.name not in CHAIN_DERIVED)

#: ChainConfig defaults of this command that differ from ChainConfig's own
CHAIN_DEFAULTS = {"lr_schedule": "linear", "diagnostics": True}

def value_problems(v: Any) -> list[str]:
    """Value checks of settings whose types are right (``v``: the field values)."""
    p: list[str] = []

    def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            p.append(f"{name}={value!r}: allowed {', '.join(allowed)} (closest: {closest(value, allowed)[0]})")

    choice("method", v.method, METHODS)
    if v.compare is not None:
        for m in v.compare:
            choice("compare", m, METHODS)
        if len(set(v.compare)) < 2:
            p.append(f"compare={','.join(v.compare)}: give at least two different methods, e.g. lora,cola")
    choice("loss", v.loss, LOSSES)
    choice("replay_loss", v.replay_loss, REPLAY_LOSSES)
    choice("eval_rule", v.eval_rule, RULES)
    if v.dtype is not None:
        choice("dtype", v.dtype, DTYPE_NAMES)
    for name in v.report_to:
        choice("report_to", name, TRACKERS)
    p += tracker_problems(v.report_to)
    for name, low in (("links", 1), ("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_batch_size", 1),
                      ("max_nonfinite_in_row", 1), ("log_every", 1), ("checkpoint_every", 0), ("n_train", 1),
                      ("n_val", 0), ("n_test", 1), ("steps", 1), ("threads", 1), ("stop_after", 1),
                      ("max_length", 8), ("replay_blocks", 1), ("kl_top_k", 1), ("train_paraphrases", 0),
                      ("eval_every", 0), ("end_at_step", 1)):
        value = getattr(v, name)
        if value is not None and value < low:
            p.append(f"{name}={value}: must be >= {low}")
    for name in ("alpha", "lr", "full_lr", "replay_ratio", "replay_weight"):
        value = getattr(v, name)
        if not (value > 0 and math.isfinite(value)):
            p.append(f"{name}={value}: must be a finite number > 0")
    if not 0 <= v.dropout < 1:
        p.append(f"dropout={v.dropout}: must be in [0, 1)")
    if not (v.weight_decay >= 0 and math.isfinite(v.weight_decay)):
        p.append(f"weight_decay={v.weight_decay}: must be a finite number >= 0")
    if v.epochs is not None and not (v.epochs > 0 and math.isfinite(v.epochs)):
        p.append(f"epochs={v.epochs}: must be a number > 0")
    if v.end_at_step is not None and v.steps is not None and v.end_at_step > v.steps:
        p.append(f"end_at_step={v.end_at_step}: after the last step (steps={v.steps})")
    if v.steps is not None and v.epochs is not None:
        p.append(f"steps={v.steps} and epochs={v.epochs}: give one of them, not both")
    if not v.seeds:
        p.append("seeds: give at least one seed")
    elif len(set(v.seeds)) != len(v.seeds):
        p.append(f"seeds={v.seeds}: repeated seeds")
    if v.n_val == 0 and v.eval_links:
        p.append("n_val=0 with eval_links: evaluating after every link needs validation examples "
                 "(or pass --no-eval-links)")
    if v.fsdp and "full" in (v.compare or [v.method]):
        p.append("fsdp with method 'full': cola train shards LoRA runs only (the LoRA factors stay replicated); "
                 "drop --fsdp, or drop 'full' from --method/--compare")
    if v.targets is not None and not v.targets:
        p.append("targets: give at least one module name pattern")
    p += task_problems(v)
    p += _chain_problems(v)
    return p


def _chain_problems(v: Any) -> list[str]:
    p = []
    unknown = [k for k in v.chain if k not in CHAIN_KEYS]
    for k in unknown:
        if k in CHAIN_DERIVED:
            p.append(f"chain.{k}: set by the run ({'steps/epochs' if k == 'total_steps' else 'seeds'}); "
                     "remove it from the chain table")
        else:
            p.append(f"unknown chain setting {k!r} (closest: {', '.join(closest(str(k), CHAIN_KEYS))})")
    if unknown:
        return p
    try:  # types and values of the chain fields, with a placeholder T
        ChainConfig(total_steps=max(10**9, v.links), seed=0,
                    **{**CHAIN_DEFAULTS, "links": v.links, **v.chain})
    except ConfigError as err:
        p += [f"chain: {x}" for x in err.problems]
    except TypeError as err:
        p.append(f"chain: {err}")
    pm = get_plugin_manager()
    for kind in STRATEGY_KINDS:
        name = v.chain.get(kind)
        if isinstance(name, str) and name:
            try:
                pm.lookup(kind, name)
            except ConfigError as err:
                p += err.problems
    return p


# ------------------------------------------------------------------ config files and checks
