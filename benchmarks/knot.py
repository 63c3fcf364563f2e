"""Cost of one knot (merge + re-init + optimizer policy) relative to one training step.

    python -m benchmarks.knot                 # OPT-125m-shaped, 8 x 128, every built-in strategy

Time: for each variant (each built-in re-init strategy, each merge rule, each optimizer
policy, and LoRA on all linear layers), a ``cola.Chain`` over an injected copy of the model
takes one warm-up step, then ``rounds`` times: one training step (timed), one forced knot
``Chain.tie_knot()`` (timed). Steps and knots alternate, so each variant's knot/step ratio is a
ratio of medians measured back to back in one process.

Peak memory: in a child process started with ``MALLOC_MMAP_THRESHOLD_`` (see
:mod:`benchmarks.common`: RSS then tracks live tensor memory), for each variant the RSS
high-water mark is reset before one training step (the chain's first: it also creates the
optimizer state, so its peak is at least a later step's) and again before one knot: the peak
above the RSS at the phase's start is that phase's peak extra memory. A knot must stay
below a step, and far below the model's size (no full-model copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from . import common as C

NAME = "knot"

#: name -> (targets, ChainConfig overrides). Defaults: reinit lora, merge rule add, optimizer reset.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "reinit=lora": ("qv", {}),
    "reinit=gaussian": ("qv", {"reinit": "gaussian"}),
    "reinit=pissa": ("qv", {"reinit": "pissa"}),
    "reinit=rac": ("qv", {"reinit": "rac"}),
    "reinit=orthogonal": ("qv", {"reinit": "orthogonal"}),
    "merge=svd-truncate": ("qv", {"merge_rule": "svd-truncate"}),
    "optimizer=prune": ("qv", {"optimizer_policy": "prune"}),
    "optimizer=keep": ("qv", {"optimizer_policy": "keep"}),
    "all-linear reinit=lora": ("all", {}),
}


def _chain(model, overrides: dict[str, Any], rank: int):
    """A fresh chain on an already injected model (links=1: knots are forced by the benchmark)."""
    import cola
    for layer in cola.lora_layers(model).values():
        layer.links = []  # each variant starts its own chain history
    return cola.Chain(model, C.adamw, cola.ChainConfig(total_steps=10**6, links=1, **overrides))


def _models(args) -> dict[str, torch.nn.Module]:
    """One injected model per target set the chosen variants need."""
    import cola
    base = C.build_model(args.model or args.shape, seed=args.seed)
    out = {}
    for which in sorted({VARIANTS[v][0] for v in args.variants}):
        model = C.fresh_copy(base)
        cola.inject_lora(model, target_modules=C.targets(model, which), rank=args.rank, alpha=16)
        out[which] = model
    return out


def time_variants(args, log) -> dict[str, Any]:
    models = _models(args)
    vocab = next(iter(models.values())).config.vocab_size
    batch = C.make_batch(vocab, args.batch, args.seq, seed=args.seed)
    results = {}
    for name in args.variants:
        which, overrides = VARIANTS[name]
        model = models[which]
        chain = _chain(model, overrides, args.rank)
        step = C.train_step_fn(model, chain, batch)
        timing: dict[str, Any] = {}
        # warm-up round (optimizer state exists from here on), then alternate step, knot
        samples = C.alternate({"step": step, "knot": chain.tie_knot}, rounds=args.rounds, warmup=1,
                              max_contention=args.max_contention, info=timing, flip=False)
        s, k = C.summary(samples["step"]), C.summary(samples["knot"])
        results[name] = {"targets": which, "overrides": overrides, "n_layers": len(chain.layers),
                         "step": s, "knot": k, "knot_over_step": k["median"] / s["median"],
                         "knot_report_seconds": [r.seconds for r in chain.history], "timing": timing}
        if log:
            log(f"  {name}: knot {C.fmt_range(k)} ms, step {C.fmt_range(s)} ms, "
                f"{100 * k['median'] / s['median']:.2f}% of a step")
    return results


def memory_child(args) -> dict[str, Any]:
    """Run in a child process with MALLOC_ENV: per variant, peak extra memory of a step and a knot."""
    models = _models(args)
    vocab = next(iter(models.values())).config.vocab_size
    batch = C.make_batch(vocab, args.batch, args.seq, seed=args.seed)
    out: dict[str, Any] = {"param_bytes": C.param_bytes(next(iter(models.values()))), "variants": {}}
    for name in args.variants:
        which, overrides = VARIANTS[name]
        model = models[which]
        chain = _chain(model, overrides, args.rank)
        step = C.train_step_fn(model, chain, batch)
        with C.PeakMemory() as ms:  # the first step: its peak is at least a later step's
            step()
        with C.PeakMemory() as mk:
            chain.tie_knot()
        out["variants"][name] = {"step_peak_delta": ms.delta, "knot_peak_delta": mk.delta,
                                 "rss_before_step": ms.start, "rss_before_knot": mk.start, "method": mk.method}
    return out


def render(result: dict[str, Any]) -> str:
    mem = result.get("memory", {})
    pb = mem.get("param_bytes")
    rows = []
    for name, r in result["time"].items():
        m = mem.get("variants", {}).get(name, {})
        ks, ss = m.get("knot_peak_delta"), m.get("step_peak_delta")
        rows.append([name, r["n_layers"], C.fmt_range(r["knot"]), f"{1e3 * r['step']['median']:.0f}",
                     f"{100 * r['knot_over_step']:.2f}%",
                     f"{C.mib(ks):.1f}" if ks is not None else "n/a",
                     f"{C.mib(ss):.0f}" if ss is not None else "n/a",
                     f"{ks / ss:.3f}" if ks is not None and ss else "n/a",
                     f"{100 * ks / pb:.2f}%" if ks is not None and pb else "n/a"])
    table = C.markdown_table(["variant", "layers", "knot ms median [min-max]", "step ms", "knot / step",
                              "knot peak +MiB", "step peak +MiB", "knot/step peak", "knot peak / model size"], rows)
    if "error" in mem:
        table += f"\n\nmemory child failed: {mem['error']}"
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.knot", description=__doc__.split("\n")[0])
    C.common_arguments(p, NAME)
    p.add_argument("--shape", default="opt-125m", help=f"random-init shape ({', '.join(C.SHAPES)})")
    p.add_argument("--model", default=None, help="a local model path instead of --shape")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    p.add_argument("--in-process", action="store_true",
                   help="measure memory in this process (no child, no malloc settings: less exact; for tests)")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}")
    return args


def _child_args(args) -> list[str]:
    out = ["--child-memory", "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--seed", str(args.seed), "--variants", *args.variants]
    if args.model:
        out += ["--model", args.model]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.apply_threads(args)
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return {}
    log = C.logger(args)
    if log:
        log(f"knot: {args.model or args.shape}, batch {args.batch} x {args.seq}, {args.rounds} rounds")
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()
                                           if k not in ("output", "quiet", "child_memory")}}
    result["time"] = time_variants(args, log)
    C.free()
    if not args.no_memory:
        if log:
            log("  peak memory (child process)...")
        if args.in_process:
            result["memory"] = memory_child(args)
            result["memory"]["method"] = "in-process (default malloc): peak RSS above the RSS at the phase's start"
        else:
            result["memory"] = C.run_child("benchmarks.knot", _child_args(args))
            result["memory"]["method"] = ("VmHWM reset per phase in a child with MALLOC_MMAP_THRESHOLD_=65536; "
                                          "peak RSS above the RSS at the phase's start")
    t = result["time"]
    targets: dict[str, Any] = {}
    if "reinit=lora" in t:
        v = t["reinit=lora"]["knot_over_step"]
        targets["one knot <= 1% of a step (q,v)"] = {"value": v, "met": v <= 0.01}
    mv = result.get("memory", {}).get("variants", {})
    if mv:
        worst = max(mv.values(), key=lambda m: m["knot_peak_delta"] / max(m["step_peak_delta"], 1))
        v = worst["knot_peak_delta"] / max(worst["step_peak_delta"], 1)
        targets["knot peak <= step peak (worst variant)"] = {"value": v, "met": v <= 1.0}
        pb = result["memory"]["param_bytes"]
        v = max(m["knot_peak_delta"] for m in mv.values()) / pb
        targets["no full-model copy in a knot (max knot peak / model size)"] = {"value": v, "met": v < 0.5}
    result["targets"] = targets
    return C.publish(result, NAME, args, render, target_digits=4)


if __name__ == "__main__":
    main(sys.argv[1:])
