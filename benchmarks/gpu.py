"""One prepared GPU run: LoRA vs COLA vs full fine-tuning on OPT-1.3B- and Llama-2-7B-shaped
random models in bf16 (one H200-class GPU, well under 8 minutes including model construction).

    pip install --no-deps --no-build-isolation -e . && python -m benchmarks.gpu
    python -m benchmarks.gpu --smoke             # CPU, tiny shapes: tests the script itself

For each model shape and method (``lora``: cola LoRA r=8 on q,v + AdamW; ``cola``: a
``cola.Chain`` of 3 links over the same steps, so both knots fall inside the timed steps;
``full``: AdamW over every parameter), in this order:

1. build the random model directly on the GPU in bf16 (``with torch.device("cuda")``);
2. ``--warmup`` untimed steps (the first one counts FLOPs, see :mod:`benchmarks.common`), then
   ``--steps`` timed steps (``torch.cuda.synchronize`` around each) at ``--seq`` tokens;
3. record median step time, tokens/s, TFLOP/s and its fraction of ``--peak-tflops`` (default
   790, the issue's bf16 figure) and of a bf16 GEMM (8192^3) timed in the same process, and
   the peak of ``torch.cuda.max_memory_allocated`` (reset before the model is built).

Full fine-tuning is checked against the GPU's memory first: torch's AdamW keeps two moments
in the parameters' dtype, so it needs parameters + gradients + 2 moments = 4 x 2 bytes per
parameter plus the activations (estimated from the LoRA run of the same shape and batch);
when that exceeds 92% of the GPU, the batch is halved until it fits or the config is skipped
with a note. Every config runs inside ``try``: a failure (an out-of-memory error is retried
once at half the batch) is recorded in the JSON and the next config runs. A time guard skips
the remaining configs when the elapsed time nears ``--budget-s`` (default 420 s); results are
written after every config, to ``$OUT/gpu.json`` when ``OUT`` is set, else
``benchmarks/results/gpu.json`` (``--output`` overrides).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import common as C

NAME = "gpu"
METHODS = ("lora", "cola", "full")
DEFAULT_BATCH = {"opt-1.3b": 16, "llama-2-7b": 8, "tiny-opt": 2, "tiny-llama": 2}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _mem_reset(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _mem_peak(device) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return C.hwm_bytes()  # CPU smoke mode: the process's peak RSS (not reset per config)


def gemm_rate(device, dtype, size: int, reps: int) -> dict[str, Any]:
    g = C.Gemm(size, size, size, dtype=dtype, device=device, reps=reps)
    g()
    times = [C.timed(g, device) for _ in range(5)]
    out = {"shape": [size, size, size], "dtype": str(dtype), "reps": reps,
           "tflops_median": g.flops / statistics.median(times) / 1e12}
    del g
    return out


def run_config(shape: str, method: str, batch: int, args, deadline: float) -> dict[str, Any]:
    """Build, warm up, time; returns the measurements (raises on failure)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    _mem_reset(device)
    t0 = time.perf_counter()
    model = C.build_model(shape, dtype=dtype, device=device, seed=args.seed)
    _sync(device)
    build_s = time.perf_counter() - t0
    data = C.make_batch(model.config.vocab_size, batch, args.seq, seed=args.seed, device=device)
    n_calls = args.warmup + args.steps
    chain = None
    if method == "lora":
        model, opt = C.setup_cola_lora(model, C.targets(model, "qv"), rank=args.rank)
    elif method == "cola":
        model, opt = C.setup_cola_chain(model, C.targets(model, "qv"), total_steps=n_calls, links=min(args.links, n_calls),
                                        rank=args.rank)
        chain = opt
    else:
        model, opt = C.setup_full(model)
    step = C.train_step_fn(model, opt, data)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = C.count_step_flops(model, step)
    _sync(device)
    for _ in range(args.warmup - 1):
        step()
    times: list[float] = []
    for _ in range(args.steps):
        times.append(C.timed(step, device))
        if time.perf_counter() > deadline:
            break
    peak = _mem_peak(device)
    tokens = batch * args.seq
    med = statistics.median(times)
    out: dict[str, Any] = {
        "shape": shape, "method": method, "batch": batch, "seq": args.seq, "dtype": args.dtype,
        "params": params, "trainable_params": trainable, "build_s": build_s,
        "step_s": C.summary(times), "timed_steps": len(times), "tokens_per_s": tokens / med,
        "amortised_tokens_per_s": tokens * len(times) / sum(times),
        "flops_per_step": flops, "tflops": flops / med / 1e12,
        "peak_fraction": flops / med / 1e12 / args.peak_tflops, "peak_memory_bytes": peak,
        "param_bytes": C.param_bytes(model),
    }
    if chain is not None:
        out["knots"] = [{"step": r.step, "seconds": r.seconds} for r in chain.history]
    del model, opt, step, chain, data
    _mem_reset(device)
    return out


def full_ft_batch(shape: str, batch: int, lora_result: dict[str, Any] | None, total_bytes: int | None,
                  ) -> tuple[int | None, str]:
    """The batch full fine-tuning can use (None: skip) and the reasoning, from the LoRA run."""
    if total_bytes is None or lora_result is None or "peak_memory_bytes" not in lora_result:
        return batch, "no estimate (no GPU total or no LoRA run of this shape): trying the batch as is"
    pb = lora_result["param_bytes"]
    acts = max(lora_result["peak_memory_bytes"] - pb, 0)  # activations + LoRA state at that batch
    fixed = 4 * pb  # bf16 params + grads + AdamW exp_avg + exp_avg_sq (torch keeps them in the param dtype)
    limit = 0.92 * total_bytes
    b = batch
    while b >= 1:
        need = fixed + acts * b / batch
        if need <= limit:
            return b, (f"estimate {need / 2**30:.1f} GiB (4 x {pb / 2**30:.1f} GiB params/grads/moments + "
                       f"{acts * b / batch / 2**30:.1f} GiB activations) <= 92% of {total_bytes / 2**30:.0f} GiB")
        b //= 2
    return None, (f"does not fit: 4 x {pb / 2**30:.1f} GiB (params, grads, 2 AdamW moments) alone "
                  f"vs 92% of {total_bytes / 2**30:.0f} GiB")


def ratios_by_shape(configs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per shape: COLA / LoRA (mean step time over the timed steps, i.e. knots included, and
    peak memory) and LoRA / full (median step time), where both ran at the same batch."""
    out: dict[str, dict[str, float | None]] = {}
    for shape in dict.fromkeys(c["shape"] for c in configs):
        ok = {c["method"]: c for c in configs if c["shape"] == shape and "step_s" in c}
        r: dict[str, float | None] = {"cola_over_lora_time": None, "cola_over_lora_memory": None,
                                      "lora_over_full_time": None}
        lora, cola_, full = ok.get("lora"), ok.get("cola"), ok.get("full")
        if lora and cola_ and lora["batch"] == cola_["batch"]:
            r["cola_over_lora_time"] = cola_["step_s"]["mean"] / lora["step_s"]["mean"]
            if lora["peak_memory_bytes"] and cola_["peak_memory_bytes"]:
                r["cola_over_lora_memory"] = cola_["peak_memory_bytes"] / lora["peak_memory_bytes"]
        if lora and full and lora["batch"] == full["batch"]:
            r["lora_over_full_time"] = lora["step_s"]["median"] / full["step_s"]["median"]
        out[shape] = r
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for r in result["configs"]:
        if "error" in r or "skipped" in r:
            rows.append([r["shape"], r["method"], r.get("batch", ""), "", "", "", "", "",
                         ("SKIPPED: " + r["skipped"]) if "skipped" in r else ("ERROR: " + r["error"][:120])])
            continue
        knots = ""
        if r.get("knots"):
            knots = f"{len(r['knots'])} knots, {1e3 * statistics.median(k['seconds'] for k in r['knots']):.0f} ms each"
        rows.append([r["shape"], r["method"], r["batch"], C.fmt_range(r["step_s"]), f"{r['tokens_per_s']:.0f}",
                     f"{r['tflops']:.1f}", f"{100 * r['peak_fraction']:.0f}%",
                     f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "", knots])
    table = C.markdown_table(["model", "method", "batch", "ms/step median [min-max]", "tokens/s", "TFLOP/s",
                              f"of {result['settings']['peak_tflops']:.0f} TFLOP/s", "peak GiB", "note"], rows)
    ratios = result.get("ratios", {})
    if ratios:
        table += "\n\n" + C.markdown_table(
            ["model", "cola / lora step time (amortised knots)", "cola / lora peak memory", "lora / full step time"],
            [[shape, *(f"{r[k]:.3f}" if r.get(k) is not None else "n/a"
                       for k in ("cola_over_lora_time", "cola_over_lora_memory", "lora_over_full_time"))]
             for shape, r in ratios.items()])
    g = result.get("gemm")
    if g:
        table += f"\n\nin-process GEMM {g['shape']} {g['dtype']}: {g['tflops_median']:.1f} TFLOP/s"
    table += f"\ntotal wall time {result['wall_s']:.0f} s (budget {result['settings']['budget_s']:.0f} s)"
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few steps: test the script")
    p.add_argument("--shapes", nargs="*", default=None, help="default opt-1.3b llama-2-7b (smoke: tiny-opt tiny-llama)")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--batch", type=int, default=None, help="one batch for every shape (default per shape)")
    p.add_argument("--seq", type=int, default=None, help="default 512 (smoke 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 10, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per config (default 3, smoke 1)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--links", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's bf16 peak for the fraction")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip remaining configs when time nears this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON path (default $OUT/gpu.json or benchmarks/results/gpu.json)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.shapes = args.shapes or (["tiny-opt", "tiny-llama"] if smoke else ["opt-1.3b", "llama-2-7b"])
    args.seq = args.seq or (32 if smoke else 512)
    args.steps = args.steps if args.steps is not None else (2 if smoke else 10)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if smoke else 3))
    args.device = args.device or ("cpu" if smoke else "cuda")
    return args


def output_path(args) -> Path:
    if args.output:
        return Path(args.output)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu.json"
    return C.RESULTS_DIR / "gpu.json"


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available: run with --smoke for the CPU test mode", file=sys.stderr)
        return {"error": "no cuda"}
    total_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    result: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "configs": [],
                              "gpu_total_bytes": total_bytes}
    path = output_path(args)

    def save():
        result["wall_s"] = time.perf_counter() - start
        C.write_json(result, NAME, path)

    try:
        result["gemm"] = gemm_rate(args.device, getattr(torch, args.dtype), 8192 if cuda else 256, 20 if cuda else 2)
        log(f"GEMM: {result['gemm']['tflops_median']:.1f} TFLOP/s")
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        result["gemm"] = None
        result["gemm_error"] = repr(err)
    longest = 0.0
    for shape in args.shapes:
        lora_result = None
        for method in args.methods:
            batch = args.batch or DEFAULT_BATCH.get(shape, 8)
            entry: dict[str, Any] = {"shape": shape, "method": method, "batch": batch}
            now = time.perf_counter()
            reserve = max(15.0, 1.3 * longest)
            if now + reserve > deadline:
                entry["skipped"] = (f"time guard: {now - start:.0f} s elapsed, the longest config so far took "
                                    f"{longest:.0f} s, budget {args.budget_s:.0f} s")
                log(f"{shape} {method}: skipped ({entry['skipped']})")
                result["configs"].append(entry)
                save()
                continue
            if method == "full" and cuda:
                fit, why = full_ft_batch(shape, batch, lora_result, total_bytes)
                entry["memory_check"] = why
                if fit is None:
                    entry["skipped"] = why
                    log(f"{shape} full: skipped ({why})")
                    result["configs"].append(entry)
                    save()
                    continue
                batch = entry["batch"] = fit
            log(f"{shape} {method}: batch {batch} x {args.seq} ...")
            t0 = time.perf_counter()
            for attempt in range(2):
                oom = False
                try:
                    entry.update(run_config(shape, method, batch, args, deadline))
                    entry.pop("error", None)
                    break
                except Exception as err:  # noqa: BLE001 - any failure is recorded, the next config runs
                    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
                    entry["error"] = f"{type(err).__name__}: {err}"
                    entry["traceback"] = traceback.format_exc()[-3000:]
                # outside the except block: the exception (and the frames holding the model) is gone
                _mem_reset(args.device)
                if oom and attempt == 0 and batch > 1 and time.perf_counter() + reserve < deadline:
                    batch = entry["batch"] = batch // 2
                    entry["retried_at_half_batch"] = True
                    log(f"{shape} {method}: out of memory, retrying at batch {batch}")
                    continue
                break
            took = time.perf_counter() - t0
            entry["config_wall_s"] = took
            longest = max(longest, took)
            if "error" in entry:
                log(f"{shape} {method}: FAILED {entry['error'][:200]}")
            else:
                log(f"{shape} {method}: {entry['tokens_per_s']:.0f} tokens/s, {entry['tflops']:.1f} TFLOP/s, "
                    f"peak {(entry['peak_memory_bytes'] or 0) / 2**30:.1f} GiB, {took:.0f} s")
                if method == "lora":
                    lora_result = entry
            result["configs"].append(entry)
            save()
    result["ratios"] = ratios_by_shape(result["configs"])
    save()
    print(render(result))
    print(f"\nwritten: {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
