"""Peak memory over a whole short chain: COLA vs LoRA vs full fine-tuning.

    python -m benchmarks.memory                  # OPT-125m-shaped, 8 x 128, 3 steps (COLA: 3 links)
    python -m benchmarks.memory --shape smollm2-135m --seq 512 --batch 2 --steps 2 --methods lora \
        --checkpointing both                     # peak activation memory with and without checkpointing

Each method runs in its own child process (CPU: started with ``MALLOC_MMAP_THRESHOLD_`` so that
RSS tracks live tensor memory, see :mod:`benchmarks.common`; CUDA: the allocator's peak):
build the model, set the method up, then train ``--steps`` steps; COLA is a ``cola.Chain``
with ``--links`` links spread evenly over those steps, so every knot happens inside the
measured run. Reported per method: the process's peak RSS (VmHWM, everything since start),
and the peak above the RSS after the model was built (``training peak``: optimizer state,
gradients, activations, knots), and the peak of the last step alone above the memory before it
(``step peak``: the peak activation memory, with the step's gradients and the loss's logits).
Methods: ``lora`` (cola LoRA + AdamW), ``cola`` (the chain), ``peft`` (PEFT LoRA + AdamW, for
reference), ``full`` (AdamW over every parameter). ``--checkpointing on`` measures them with
gradient checkpointing (transformers' non-reentrant checkpointing of every decoder layer, as
``cola train --gradient-checkpointing``), ``both`` each method without and with it (``<method>+ckpt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from cola.llm.performance import enable_checkpointing

from . import common as C

NAME = "memory"
METHODS = ("lora", "cola", "peft", "full")


def child(args) -> dict[str, Any]:
    device = args.device
    dtype = getattr(torch, args.dtype)
    model = C.build_model(args.model or args.shape, dtype=dtype, device=device, seed=args.seed)
    if args.ckpt:
        enable_checkpointing(model)
    batch = C.make_batch(model.config.vocab_size, args.batch, args.seq, seed=args.seed, device=device)
    tgt = C.targets(model, args.targets)
    C.free()
    build_peak = C.hwm_bytes()  # model construction's own high-water mark (before the reset)
    with C.PeakMemory(device) as pm:
        if args.method == "lora":
            model, opt = C.setup_cola_lora(model, tgt, rank=args.rank)
        elif args.method == "cola":
            model, opt = C.setup_cola_chain(model, tgt, total_steps=args.steps, links=min(args.links, args.steps), rank=args.rank)
        elif args.method == "peft":
            model, opt = C.setup_peft_lora(model, tgt, rank=args.rank)
        else:
            model, opt = C.setup_full(model)
        step = C.train_step_fn(model, opt, batch)
        for _ in range(args.steps - 1):
            step()
    with C.PeakMemory(device) as last:  # the last step alone: optimizer state exists, activations come and go
        step()
    peak = max(pm.peak, last.peak)
    out = {"method": args.method, "gradient_checkpointing": args.ckpt, "training_peak_delta": peak - pm.start,
           "start": pm.start, "peak": peak, "step_peak_delta": last.delta, "step_start": last.start,
           "process_peak": max(build_peak, peak) if not pm.cuda else peak, "build_peak": build_peak,
           "param_bytes": C.param_bytes(model), "memory_method": pm.method}
    if hasattr(opt, "history"):
        out["knots"] = [r.step for r in opt.history]
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    ref = result["methods"].get("lora", {})
    for name, m in result["methods"].items():
        if "error" in m:
            rows.append([name, "error", m["error"][-200:], "", "", ""])
            continue
        rel = (f"{m['training_peak_delta'] / ref['training_peak_delta']:.3f}"
               if ref.get("training_peak_delta") else "")
        rel_abs = f"{m['process_peak'] / ref['process_peak']:.3f}" if ref.get("process_peak") else ""
        rows.append([name, f"{C.mib(m['process_peak']):.0f}", f"{C.mib(m['training_peak_delta']):.0f}",
                     f"{C.mib(m['step_peak_delta']):.0f}", rel_abs, rel, ",".join(map(str, m.get("knots", []))) or "-"])
    table = C.markdown_table(["method", "process peak MiB", "training peak +MiB", "step peak +MiB",
                              "process peak / lora", "training peak / lora", "knots at steps"], rows)
    ckpt = [[k, f"{v['without_mib']:.1f}", f"{v['with_mib']:.1f}", f"{v['ratio']:.2f}"]
            for k, v in result.get("checkpointing", {}).items()]
    if ckpt:
        table += "\n\n" + C.markdown_table(["method", "peak activation MiB", "with checkpointing MiB",
                                             "without / with"], ckpt)
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    C.common_arguments(p, NAME)
    p.add_argument("--shape", default="opt-125m", help=f"random-init shape ({', '.join(C.SHAPES)})")
    p.add_argument("--model", default=None, help="a local model path instead of --shape")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--targets", default="qv", choices=["qv", "all"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--links", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--in-process", action="store_true",
                   help="run the methods in this process, one after another (less exact; for tests)")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "both"],
                   help="gradient checkpointing: off, on, or both (each method without and with it)")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)  # child mode: with checkpointing
    return p.parse_args(argv)


def measure(args, method: str, ckpt: bool) -> dict[str, Any]:
    """One method in a child process (or in this one with ``--in-process``)."""
    child_args = ["--method", method, "--shape", args.shape, "--targets", args.targets,
                  "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
                  "--steps", str(args.steps), "--links", str(args.links), "--device", args.device,
                  "--dtype", args.dtype, "--seed", str(args.seed)]
    if args.model:
        child_args += ["--model", args.model]
    if args.threads:
        child_args += ["--threads", str(args.threads)]
    if ckpt:
        child_args.append("--ckpt")
    if not args.in_process:
        return C.run_child("benchmarks.memory", child_args)
    out = child(parse_args(child_args))
    C.free()
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.apply_threads(args)
    if args.method:
        print(json.dumps(child(args)))
        return {}
    log = C.logger(args)
    methods = {}
    variants = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    for method in args.methods:
        for ckpt in variants:
            name = method + ("+ckpt" if ckpt and args.checkpointing == "both" else "")
            if log:
                log(f"memory: {name} ({args.model or args.shape}, {args.batch} x {args.seq}, {args.steps} steps"
                    f"{', gradient checkpointing' if ckpt else ''})")
            methods[name] = measure(args, method, ckpt)
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("output", "quiet", "method")},
                              "method": "one child process per method; CPU: MALLOC_MMAP_THRESHOLD_=65536, VmHWM "
                                        "(process peak) and VmHWM reset after the model is built (training peak) "
                                        "and before the last step (step peak: peak activation memory); "
                                        "CUDA: max_memory_allocated",
                              "methods": methods}
    targets = {}
    result["checkpointing"] = {}
    for method in args.methods if args.checkpointing == "both" else []:
        plain, ckpt = methods[method], methods[f"{method}+ckpt"]
        if plain.get("step_peak_delta", 0) > 0 and ckpt.get("step_peak_delta", 0) > 0:
            v = plain["step_peak_delta"] / ckpt["step_peak_delta"]
            result["checkpointing"][method] = {"without_mib": C.mib(plain["step_peak_delta"]),
                                               "with_mib": C.mib(ckpt["step_peak_delta"]), "ratio": v}
            targets[f"{method}: peak activation memory without / with checkpointing >= 2"] = {"value": v,
                                                                                               "met": v >= 2}
    lora, cola_ = methods.get("lora", {}), methods.get("cola", {})
    if "training_peak_delta" in lora and "training_peak_delta" in cola_:
        v = cola_["process_peak"] / lora["process_peak"]
        targets["COLA process peak <= 1.05 x LoRA"] = {"value": v, "met": v <= 1.05}
        v = cola_["training_peak_delta"] / lora["training_peak_delta"]
        targets["COLA training peak <= 1.05 x LoRA"] = {"value": v, "met": v <= 1.05}
    result["targets"] = targets
    return C.publish(result, NAME, args, render, target_digits=3)


if __name__ == "__main__":
    main(sys.argv[1:])
