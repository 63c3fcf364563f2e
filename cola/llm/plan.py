"""The plan of a ``cola train`` run: knots, rank and trainable parameters of every link, and FLOPs.

Knots and ranks come from the core's one plan function, :func:`cola.plan`; this module adds
what only the LLM layer knows: the layers LoRA wraps, the sizes of the model and of an example,
and from them the estimated training and evaluation FLOPs.

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

from dataclasses import dataclass
from typing import Any


import cola
from cola.errors import ConfigError
from cola.planning import build_strategies
from cola.llm.settings import TrainSettings
from cola.llm.tasks.kind import ExampleSize

FLOPS_FORMULA = ("per training token: forward 2*(N+N_lora) + backward 2*(N+N_lora) (activation gradients) "
                 "+ 2*N_trainable (weight gradients of trained parameters only), N = parameters outside the "
                 "embeddings; LM head 2*V*d forward and backward only at answer positions (every position for the "
                 "corpus task and for replay blocks); a re-init that probes the gradient at a knot adds its passes as "
                 "steps; attention's sequence-squared terms left out; evaluation = forward only")


@dataclass(frozen=True)
class ModelSize:
    """What the FLOP estimates need to know about a model."""

    body: int     #: parameters outside the input embedding and the LM head
    vocab: int    #: rows of the LM head
    width: int    #: its input width
    total: int    #: every (distinct) parameter

    def to_dict(self) -> dict[str, int]:
        return {"body": self.body, "vocab": self.vocab, "width": self.width, "all": self.total}


def model_size(model) -> ModelSize:
    """The :class:`ModelSize` of a causal LM (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = {id(embed)} | ({id(head.weight)} if head is not None else set())
    vocab, width = (head.weight.shape if head is not None else embed.shape)
    return ModelSize(sum(n for i, n in seen.items() if i not in excluded), int(vocab), int(width), sum(seen.values()))


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
                shapes: dict[str, tuple[int, int]], size: ModelSize, sizes: ExampleSize,
                examples_per_step: int, replay: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Knots, rank and trainable parameters of each link, and the estimated training FLOPs (``replay``: blocks per
    step and their length, every position through the LM head)."""
    tokens, positions = sizes.train_tokens, sizes.train_positions
    if method == "full":
        flops = (flops_per_example(tokens, positions, size.body, 0, size.body, size.vocab, size.width, True)
                 * examples_per_step + replay[0] * flops_per_example(replay[1], replay[1], size.body, 0, size.body,
                                                                     size.vocab, size.width, True))
        return {"method": method, "links": 1, "knots": [], "ranks": [], "lr": settings.full_lr,
                "steps_per_link": [total_steps], "trainable_params": [size.total],
                "train_flops": [flops * total_steps], "chain": None}
    config = settings.chain_config(method, total_steps, seed)
    max_rank = min(min(s) for s in shapes.values()) if shapes else None
    try:  # every strategy is built (so bad options are found before anything trains), then the plan
        strategies = build_strategies(config)
        chain_plan = cola.plan(config, settings.rank, max_rank, strategies=strategies)
    except ConfigError as err:
        raise ConfigError([f"{method}: {p}" for p in err.problems]) from None
    trainable = [sum(r * (i + o) for i, o in shapes.values()) for r in chain_plan.ranks]
    steps = chain_plan.steps_per_link
    # a re-init that probes the gradient at a knot (fw) costs forward-backward passes of one step's batch:
    # charged to the link the knot starts
    probes = [0] + [getattr(strategies["reinit"], "probe_passes", 0)] * (len(steps or [1]) - 1)
    flops = None if steps is None else [
        (flops_per_example(tokens, positions, size.body, t, t, size.vocab, size.width) * examples_per_step
         + flops_per_example(replay[1], replay[1], size.body, t, t, size.vocab, size.width) * replay[0]) * (s + k)
        for t, s, k in zip(trainable, steps, probes)]
    knots = list(chain_plan.knots) if chain_plan.knots is not None else None
    return {"method": method, "links": chain_plan.links, "knots": knots, "ranks": list(chain_plan.ranks),
            "lr": settings.lr, "steps_per_link": steps, "trainable_params": trainable, "train_flops": flops,
            "probe_passes_per_knot": probes[-1] if len(probes) > 1 else 0, "chain": config.to_dict()}


def _replay_per_step(settings: TrainSettings, task) -> tuple[int, int]:
    """``(replay blocks per optimizer step, their length)``; ``(0, 0)`` without replay."""
    pool = (getattr(task, "info", None) or {}).get("replay")
    if not pool:
        return 0, 0
    return pool["blocks_per_micro_batch"] * settings.grad_accum, pool["pool"]["block_length"]


def build_plan(settings: TrainSettings, model, task, splits: dict, sizes: ExampleSize, max_length: int | None,
               total_steps: int) -> dict[str, Any]:
    """The plan of every method of ``settings`` (what ``--dry-run`` prints and ``results.json`` keeps)."""
    seeds, methods = settings.seeds, settings.methods
    size = model_size(model)
    shapes = lora_shapes(model, settings) if any(m != "full" for m in methods) else {}
    n_train = len(splits[seeds[0]].train)
    per_step = settings.batch_size * settings.grad_accum
    plan = {
        "model": {"name": settings.model, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None), "parameters": size.total,
                  "body_parameters": size.body, "vocab": size.vocab, "hidden": size.width, "lora_layers": len(shapes),
                  "lora_targets": sorted({n.rsplit(".", 1)[-1] for n in shapes})},
        "task": task.name, "answers": list(task.answers), "splits": {str(s): splits[s].sizes() for s in seeds},
        "max_length": max_length, "tokens_per_example": sizes.train_tokens,
        "positions_per_example": sizes.train_positions, "total_steps": total_steps, "examples_per_step": per_step,
        "epochs": total_steps * per_step / max(1, n_train),
        "methods": {m: method_plan(settings, m, total_steps, seeds[0], shapes, size, sizes, per_step,
                                   _replay_per_step(settings, task)) for m in methods},
    }
    first = splits[seeds[0]]
    n_val, n_test = len(first.validation), len(first.test)
    if hasattr(first.test, "reference"):  # the corpus and facts tasks score the reference text beside each split
        n_val += first.validation.reference.n_blocks
        n_test += first.test.reference.n_blocks + len(getattr(first.test, "paraphrases", ()))
        plan[task.name] = {**task.info, "splits": {str(s): splits[s].summary for s in seeds}}
    eval_fwd = flops_per_example(sizes.eval_tokens, sizes.eval_positions, size.body, 0, 0, size.vocab, size.width,
                                 backward=False)
    for p in plan["methods"].values():
        n_evals = ((1 + p["links"]) if settings.eval_links else 0) + (
            total_steps // settings.eval_every + 1 if settings.eval_every else 0)
        p["eval_flops"] = eval_fwd * (n_val * n_evals + 2 * n_test)
    return plan
