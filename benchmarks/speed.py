"""Training-step speed: cola LoRA vs PEFT LoRA vs a COLA chain vs full fine-tuning.

    python -m benchmarks.speed                      # OPT-125m- and SmolLM2-135M-shaped, 8 x 128
    python -m benchmarks.speed --model /path/to/local/model --rounds 7
    python -m benchmarks.speed --shapes smollm2-135m --configs cola-qv chain-qv --compile   # + compiled twins

For each model, every configuration is built on its own copy of the same random init and all
are timed in one process, one step at a time, alternating (see :mod:`benchmarks.common`):

* ``peft-qv`` / ``cola-qv``: PEFT LoRA and cola LoRA (r=8, alpha=16, no dropout) on q_proj,
  v_proj, plain AdamW over the factors;
* ``peft-all`` / ``cola-all``: the same on every Linear but the LM head;
* ``chain-qv``: a ``cola.Chain`` of 3 links on q,v (``even`` policy over exactly the steps this
  benchmark runs, so its 2 knots happen inside the measured steps);
* ``full``: full fine-tuning (AdamW over all parameters);
* ``gemm``: the reference fp32 GEMM, alternated with the steps.

Reported: step time (median, min-max), tokens/s, counted FLOPs per step and achieved FLOP/s as
a fraction of the GEMM rate, and the ratios cola/PEFT, chain/cola (with the knots amortised:
median knot-free chain step + total knot time / steps) and LoRA/full.

``--compile`` adds a twin ``<config>+compile`` of each config whose decoder is compiled
(``torch.compile``, inductor, as ``cola train --compile``), timed in the same rounds: the ratio
``<config>+compile/<config>`` says whether compiling pays, and ``compiles`` counts the twin's
compilations (the chain's knots, at one rank, should add none). The compile itself happens in
the warm-up round; FLOPs are the eager twin's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch

from . import common as C

NAME = "speed"
CONFIGS = ("peft-qv", "cola-qv", "chain-qv", "peft-all", "cola-all", "full")
#: Not run by default: cola LoRA with the proposed fused forward (see benchmarks.layer).
EXTRA_CONFIGS = ("cola_addmm-qv", "cola_addmm-all")


def _counted(model, step, store: dict[str, float], key: str):
    """``step``, whose first call also counts its FLOPs into ``store[key]``."""
    first = [True]

    def fn():
        if first[0]:
            first[0] = False
            with C.FlopCounter(model) as counter:
                step()
            store[key] = counter.total
        else:
            step()
    return fn


#: Default sequence length per shape (keeps the default run under 5 minutes on 2 cores).
DEFAULT_SEQ = {"smollm2-135m": 64}


def _compiled(model, counters: dict[str, Any], name: str, backend: str) -> None:
    """Compile ``model``'s decoder in place (as ``cola train --compile``), counting its compilations."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one entry per twin
    counters[name] = CompileCounterWithBackend(backend)
    C.decoder_of(model).compile(backend=counters[name])


def bench_model(shape: str, args, log) -> dict[str, Any]:
    seq = args.seq or DEFAULT_SEQ.get(shape, 128)
    base = C.build_model(shape, seed=args.seed, dtype=getattr(torch, args.dtype))
    vocab = base.config.vocab_size
    batch = C.make_batch(vocab, args.batch, seq, seed=args.seed)
    n_calls = args.warmup + args.rounds
    tasks, flops, chains, trainables, counters = {}, {}, {}, {}, {}
    names = [n for c in args.configs for n in ([c, f"{c}+compile"] if args.compile else [c])]
    for name in names:
        model = C.fresh_copy(base)
        which = name.removesuffix("+compile").rsplit("-", 1)[-1]
        if name.startswith("peft"):
            model, opt = C.setup_peft_lora(model, C.targets(model, which), rank=args.rank)
        elif name.startswith("cola_addmm"):
            from .layer import addmm_forward
            model, opt = C.setup_cola_lora(model, C.targets(model, which), rank=args.rank)
            import cola
            for layer in cola.lora_layers(model).values():
                layer.forward = addmm_forward.__get__(layer)
        elif name.startswith("cola"):
            model, opt = C.setup_cola_lora(model, C.targets(model, which), rank=args.rank)
        elif name.startswith("chain"):
            model, opt = C.setup_cola_chain(model, C.targets(model, which), total_steps=n_calls,
                                            links=min(args.links, n_calls), rank=args.rank)
            chains[name] = opt
        elif name.removesuffix("+compile") == "full":
            model, opt = C.setup_full(model)
        else:
            raise ValueError(f"unknown config {name!r}; allowed: {', '.join(CONFIGS + EXTRA_CONFIGS)}")
        trainables[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if name.endswith("+compile"):
            _compiled(model, counters, name, args.compile_backend)
            tasks[name] = C.train_step_fn(model, opt, batch)
        else:
            tasks[name] = _counted(model, C.train_step_fn(model, opt, batch), flops, name)
    gemm = C.Gemm(reps=args.gemm_reps)
    tasks["gemm"] = gemm
    del base
    if log:
        log(f"{shape}: {len(tasks) - 1} configs, batch {args.batch} x {seq}, "
            f"{args.warmup} warm-up + {args.rounds} rounds")
    timing: dict[str, Any] = {}
    samples = C.alternate(tasks, rounds=args.rounds, warmup=args.warmup, log=log,
                          max_contention=args.max_contention, info=timing)
    kept = timing["kept"]
    for name in counters:
        flops[name] = flops[name.removesuffix("+compile")]
    gemm_rate = statistics.median(gemm.flops / t for t in samples["gemm"])
    tokens = args.batch * seq
    out: dict[str, Any] = {
        "batch": args.batch, "seq": seq,
        "gemm": {"shape": list(gemm.shape), "flops_per_call": gemm.flops, "rate_flops_per_s_median": gemm_rate,
                 **C.summary(samples["gemm"])},
        "configs": {}, "ratios": {}, "timing": timing,
    }
    for name in names:
        s = C.summary(samples[name])
        out["configs"][name] = {
            **s, "trainable_params": trainables[name], "tokens_per_s": tokens / s["median"],
            "flops_per_step": flops[name], "flops_per_s": flops[name] / s["median"],
            "gemm_fraction": flops[name] / s["median"] / gemm_rate,
        }
        if name in counters:
            out["configs"][name]["compiles"] = counters[name].frame_count
    cfg = out["configs"]

    def add_ratio(label: str, a: str, b: str) -> None:
        if a in cfg and b in cfg:
            out["ratios"][label] = C.ratio(samples[a], samples[b], kept[a], kept[b])

    for which in ("qv", "all"):
        add_ratio(f"cola/peft {which}", f"cola-{which}", f"peft-{which}")
        add_ratio(f"cola_addmm/peft {which}", f"cola_addmm-{which}", f"peft-{which}")
        add_ratio(f"cola_addmm/cola {which}", f"cola_addmm-{which}", f"cola-{which}")
        add_ratio(f"cola-{which}/full", f"cola-{which}", "full")
        add_ratio(f"peft-{which}/full", f"peft-{which}", "full")
    for name in counters:
        add_ratio(f"{name}/{name.removesuffix('+compile')}", name, name.removesuffix("+compile"))
    for name, chain in chains.items():
        which = name.removesuffix("+compile").rsplit("-", 1)[-1]
        # Round r is call warmup + r (0-based) of every task; a knot at optimizer step k
        # happened inside call k - 1.
        knot_calls = {r.step - 1 for r in chain.history}
        calls = [args.warmup + r for r in kept[name]]
        knot_free = [t for i, t in zip(calls, samples[name]) if i not in knot_calls]
        knot_s = [r.seconds for r in chain.history]
        # amortised over the chain's nominal length (warm-up + rounds steps, 3 links)
        amortised = statistics.median(knot_free or samples[name]) + (
            len(knot_s) * statistics.median(knot_s) / n_calls if knot_s else 0.0)
        info = {"knot_steps": [r.step for r in chain.history], "knot_seconds": knot_s,
                "knot_free_median": statistics.median(knot_free) if knot_free else None,
                "amortised_step": amortised, "chain_steps": n_calls, "links": min(args.links, n_calls)}
        cfg[name].update(info)
        ref = f"cola-{which}" + ("+compile" if name.endswith("+compile") else "")
        if ref in cfg:
            add_ratio(f"{name}/{ref}", name, ref)
            out["ratios"][f"{name}/{ref}"]["amortised_ratio"] = amortised / cfg[ref]["median"]
            out["ratios"][f"{name}/{ref}"]["knot_fraction_of_step"] = (
                statistics.median(knot_s) / cfg[ref]["median"] if knot_s else None)
    return out


def targets_met(models: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, per model, from the measured ratios."""
    res: dict[str, Any] = {}
    for shape, m in models.items():
        r, cfg = m["ratios"], m["configs"]
        t: dict[str, Any] = {}
        for which in ("qv", "all"):
            key = f"cola/peft {which}"
            if key in r:
                t[f"cola/peft {which} <= 1.00"] = {"value": r[key]["median_ratio"], "met": r[key]["median_ratio"] <= 1.0}
        if "chain-qv/cola-qv" in r:
            v = r["chain-qv/cola-qv"]["amortised_ratio"]
            t["chain (amortised knots)/LoRA <= 1.02"] = {"value": v, "met": v <= 1.02}
        for name in ("cola-qv", "peft-qv"):
            if name in cfg:
                v = cfg[name]["gemm_fraction"]
                t[f"{name} FLOP/s >= 0.75 GEMM"] = {"value": v, "met": v >= 0.75}
        res[shape] = t
    return res


def render(result: dict[str, Any]) -> str:
    rows = []
    for shape, m in result["models"].items():
        for name, c in m["configs"].items():
            rows.append([f"{shape} {m['batch']}x{m['seq']}", name, C.fmt_range(c), f"{c['tokens_per_s']:.0f}",
                         f"{c['flops_per_step'] / 1e9:.0f}", f"{c['flops_per_s'] / 1e9:.1f}",
                         f"{100 * c['gemm_fraction']:.0f}%"])
        g = m["gemm"]
        rows.append([shape, "gemm 1024x768x3072", C.fmt_range(g), "", f"{g['flops_per_call'] / 1e9:.1f}",
                     f"{g['rate_flops_per_s_median'] / 1e9:.1f}", "100%"])
    out = [C.markdown_table(["model", "config", "ms/step median [min-max]", "tokens/s", "GFLOP/step",
                             "GFLOP/s", "of GEMM rate"], rows), ""]
    for shape, m in result["models"].items():
        t = m["timing"]
        out.append(f"{shape}: {t['rounds_run']} rounds run, {len(t['clean_rounds'])} clean (other processes "
                   f"<= {t['max_contention']} cores during every call)"
                   + ("" if t["paired"] else "; NOT ENOUGH CLEAN ROUNDS: each config kept its least contended calls"))
    out.append("")
    rows = []
    for shape, m in result["models"].items():
        for key, r in m["ratios"].items():
            extra = ""
            if "amortised_ratio" in r:
                extra = f"amortised {r['amortised_ratio']:.3f}; knot {100 * r['knot_fraction_of_step']:.2f}% of a step"
            rows.append([shape, key, f"{r['median_ratio']:.3f}",
                         f"{r['round_ratio_min']:.3f}-{r['round_ratio_max']:.3f}", extra])
    out.append(C.markdown_table(["model", "ratio", "of medians", "per-round min-max", "note"], rows))
    rows = [[shape, k, f"{v['value']:.3f}", "yes" if v["met"] else "NO"]
            for shape, t in result["targets"].items() for k, v in t.items()]
    out += ["", C.markdown_table(["model", "target", "measured", "met"], rows)]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    C.common_arguments(p, NAME)
    p.add_argument("--shapes", nargs="*", default=["opt-125m", "smollm2-135m"],
                   help=f"random-init shapes ({', '.join(C.SHAPES)})")
    p.add_argument("--model", default=None, help="a local model path (benchmarked instead of --shapes)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {', '.join(CONFIGS)} (also: {', '.join(EXTRA_CONFIGS)})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base weights' dtype (LoRA factors stay float32 over bf16/fp16, as in PEFT)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default 128; 64 for smollm2-135m, to fit 5 minutes)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--links", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gemm-reps", type=int, default=20)
    p.add_argument("--compile", action="store_true",
                   help="also time each config with its decoder compiled (torch.compile): <config>+compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first call counts FLOPs)")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.apply_threads(args)
    log = C.logger(args)
    shapes = [args.model] if args.model else args.shapes
    models = {}
    for shape in shapes:
        models[shape] = bench_model(shape, args, log)
        C.free()
    result = {"settings": C.settings_of(args), "models": models, "targets": targets_met(models)}
    return C.publish(result, NAME, args, render)


if __name__ == "__main__":
    main(sys.argv[1:])
