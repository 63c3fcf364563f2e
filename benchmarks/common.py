"""Shared machinery of the benchmarks: models, training steps, A/B timing, GEMM rate, FLOPs,
peak memory, markdown tables and JSON results.

Timing method
-------------
All configurations of one benchmark live in one process and are timed one call at a time,
alternating: ``A B C``, then ``C B A``, then ``A B C``... (the order flips every round so a
slow drift of the shared machine does not favour whoever goes first), after ``warmup`` untimed
rounds. Each call is timed with ``time.perf_counter`` (with ``torch.cuda.synchronize`` around it
on CUDA). We report the median and min-max over rounds, and ratios of medians; never one
absolute time as a claim. On a shared CPU, the CPU time other processes used during each call
is read from ``/proc/stat``; rounds where they used more than 0.1 cores during any call are
re-run (up to as many extra rounds again), and the JSON records every call's contention and
which rounds were kept (see :func:`alternate`).

FLOP counting (documented formula)
----------------------------------
FLOPs of one training step are counted analytically from the shapes actually executed, by
forward hooks attached during one (warm-up) step:

* every ``nn.Linear`` call on ``N`` tokens (``N`` = input numel / in_features) costs
  ``2 N in out`` forward; backward costs ``2 N in out`` for the input gradient when the input
  requires grad, plus ``2 N in out`` for the weight gradient when the weight requires grad.
  So a trained layer costs 3x its forward, a frozen layer 2x (or 1x when nothing below it
  needs a gradient, e.g. layer 0's q/k/v under LoRA). This covers the LM head (at the
  positions where it is applied) and PEFT's LoRA factors (which are ``nn.Linear`` modules).
* a ``cola.LoRALinear``'s low-rank path ``x -> A -> B`` costs ``2 N r (in + out)`` forward;
  backward: ``2 N r out`` each for dB (if B trains) and for the gradient of the rank-r
  activation (if A trains or x needs grad), ``2 N r in`` each for dA (if A trains) and dx
  (if x needs grad). Its frozen base ``nn.Linear`` is counted by the rule above.
* causal self-attention (``Q K^T`` and ``P V``) costs ``2 N s d_attn`` forward per layer
  (the causal half of ``4 N s d_attn``; ``d_attn`` = heads x head_dim, ``s`` = sequence
  length), and 2x that backward. This is an approximation (it ignores which of Q/K/V need
  gradients in layer 0); it is ~1-2% of the total at these shapes.
* element-wise work (norms, activations, softmax, dropout, the loss, the optimizer update) is
  not counted: it is memory-bound and small in FLOPs.

Achieved FLOP/s of a step = counted FLOPs / median step time; the reference is the rate of a
plain fp32 GEMM (1024 x 768 @ 768 x 3072, OPT-125m's MLP shape) timed in the same process,
alternated with the steps.

Peak memory method (CPU)
------------------------
Linux keeps a per-process RSS high-water mark (``VmHWM`` in ``/proc/self/status``); writing
``5`` to ``/proc/self/clear_refs`` resets it to the current RSS (Linux >= 4.0; we check, and
fall back to a thread polling VmRSS every 0.5 ms when the reset is refused). PyTorch's CPU
allocator is plain ``malloc``/``free``, and glibc keeps freed memory mapped, so RSS is an upper
envelope of live tensor memory that can hide a phase's allocations inside memory freed earlier.
Measuring subprocesses therefore run with ``MALLOC_MMAP_THRESHOLD_=65536`` (and a matching trim
threshold): every allocation of 64 KiB or more gets its own ``mmap`` and goes back to the OS on
``free``, so RSS tracks live memory and the high-water mark of a phase is the phase's peak.
On CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import cola.io

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --------------------------------------------------------------------------- model shapes
# Random-init stand-ins of real models: (config family, config kwargs). The real models'
# hyper-parameters; weights are random, which does not change the cost of a step.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Tiny shapes for smoke tests.
    "tiny-opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=32)),
    "tiny-llama": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                                 tie_word_embeddings=True)),
}


def model_config(shape: str):
    """The transformers config of a named shape."""
    from transformers import LlamaConfig, OPTConfig
    family, kwargs = SHAPES[shape]
    return (OPTConfig if family == "opt" else LlamaConfig)(**kwargs)


def build_model(shape_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A causal LM in training mode: a random init of a named shape (built directly on
    ``device`` in ``dtype``), or a real model from a local path."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    if shape_or_path in SHAPES:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config(shape_or_path), dtype=dtype,
                                                     attn_implementation=attn_implementation)
        if any(p.device.type != torch.device(device).type for p in model.parameters()):
            model.to(device)  # a transformers version that ignores the device context
    else:
        model = AutoModelForCausalLM.from_pretrained(shape_or_path, dtype=dtype,
                                                     attn_implementation=attn_implementation).to(device)
    model.train()
    return model


def fresh_copy(model: nn.Module) -> nn.Module:
    """An independent copy (same weights) for another configuration."""
    return copy.deepcopy(model)


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Leaf names of every ``nn.Linear`` but the output head: the "all-linear" targets."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"})


def targets(model: nn.Module, which: str) -> list[str]:
    """``"qv"`` -> q_proj, v_proj (the paper's targets); ``"all"`` -> every Linear but lm_head."""
    if which == "qv":
        return ["q_proj", "v_proj"]
    if which == "all":
        return linear_leaf_names(model)
    raise ValueError(f"targets: {which!r} (allowed: qv, all)")


# --------------------------------------------------------------------------- set-ups
def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random token ids; labels = inputs (the causal-LM loss over every position)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def adamw(params: Iterable[nn.Parameter], lr: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer of every configuration: torch AdamW (same for all), fused on CUDA (as cola train uses it,
    and the fused kernel skips a non-finite step on the device)."""
    params = list(params)
    fused = bool(params) and params[0].device.type == "cuda" or None
    return torch.optim.AdamW(params, lr=lr, fused=fused)


def _factor_dtype(model: nn.Module) -> torch.dtype | None:
    """float32 factors over a bf16/fp16 base, as ``cola train`` and PEFT (``autocast_adapter_dtype``) do."""
    return torch.float32 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else None


def setup_cola_lora(model: nn.Module, target_modules: list[str], rank: int = 8, alpha: float = 16):
    """cola.inject_lora + AdamW over the LoRA factors."""
    import cola
    cola.inject_lora(model, target_modules=target_modules, rank=rank, alpha=alpha, lora_dtype=_factor_dtype(model))
    params = [p for layer in cola.lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    return model, adamw(params)


def setup_cola_chain(model: nn.Module, target_modules: list[str], total_steps: int, links: int = 3,
                     rank: int = 8, alpha: float = 16, **config: Any):
    """cola.inject_lora + cola.Chain (AdamW factory) with ``links`` evenly spaced links and the chain's
    defaults (the non-finite guard on, the compensation buffer where ``auto`` puts it)."""
    import cola
    cola.inject_lora(model, target_modules=target_modules, rank=rank, alpha=alpha, lora_dtype=_factor_dtype(model))
    return model, cola.Chain(model, adamw, cola.ChainConfig(total_steps=total_steps, links=links, **config))


def setup_peft_lora(model: nn.Module, target_modules: list[str], rank: int = 8, alpha: float = 16):
    """PEFT get_peft_model with the same rank, alpha and targets + AdamW over its trainable params."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=target_modules, bias="none"))
    return peft_model, adamw(p for p in peft_model.parameters() if p.requires_grad)


def setup_full(model: nn.Module):
    """Full fine-tuning: every parameter trains, AdamW over all of them."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model, adamw(model.parameters())


def train_step_fn(model: nn.Module, optimizer, batch: dict[str, torch.Tensor],
                  loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = lm_loss) -> Callable[[], float]:
    """One training step: loss, backward, ``optimizer.step()`` (a torch optimizer or a
    ``cola.Chain``, whose step may tie a knot), zero_grad."""
    def step() -> float:
        loss = loss_fn(model, batch)
        loss.backward()
        if hasattr(optimizer, "tie_knot"):
            optimizer.step(loss)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


# --------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine incl. steal, this process's user+sys jiffies), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        return sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def timed_with_load(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, float | None]:
    """(seconds, cores used by *other* processes meanwhile, from /proc/stat; None if unknown or
    the call was too short for the 1/HZ resolution)."""
    before = _jiffies()
    seconds = timed(fn, device)
    after = _jiffies()
    if before is None or after is None or seconds < 0.2:
        return seconds, None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return seconds, max(others, 0) / _HZ / seconds


def alternate(tasks: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
              device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
              max_contention: float | None = 0.1, extra_rounds: int | None = None,
              info: dict[str, Any] | None = None, flip: bool = True) -> dict[str, list[float]]:
    """Time each task once per round, alternating the tasks (order flips every round unless
    ``flip`` is False).

    ``warmup`` untimed rounds first. Returns, per task, ``rounds`` timings in seconds.

    On a shared machine, other processes' CPU use during each call is measured from
    ``/proc/stat`` (:func:`timed_with_load`); a round is *clean* when during each of its calls
    they used at most ``max_contention`` cores on average. Up to ``extra_rounds`` (default
    ``rounds``) more rounds are run to collect ``rounds`` clean rounds, which are kept (every
    task keeps the same rounds, so they pair). If there are not enough, each task keeps its
    ``rounds`` least contended calls instead (``info["paired"]`` is then False). ``info``
    (when given) receives the bookkeeping: rounds run, each call's contention, the kept round
    indices per task (pass them to :func:`ratio`). ``max_contention=None`` (and CUDA) keeps the
    first ``rounds`` rounds.
    """
    names = list(tasks)
    for w in range(warmup):
        for name in names:
            seconds = timed(tasks[name], device)
            if log:
                log(f"  warm-up {w + 1}/{warmup} {name}: {seconds:.3f} s")
    extra = rounds if extra_rounds is None else extra_rounds
    if max_contention is None or torch.device(device).type == "cuda":
        max_contention, extra = None, 0

    def clean(load: float | None) -> bool:
        return max_contention is None or load is None or load <= max_contention

    collected: list[dict[str, tuple[float, float | None]]] = []
    clean_rounds: list[int] = []
    while len(clean_rounds) < rounds and len(collected) < rounds + extra:
        r = len(collected)
        order = names if r % 2 == 0 or not flip else names[::-1]
        calls = {name: timed_with_load(tasks[name], device) for name in order}
        collected.append(calls)
        if all(clean(load) for _, load in calls.values()):
            clean_rounds.append(r)
        if log:
            log(f"  round {r + 1}: " + ", ".join(
                f"{n} {calls[n][0]:.3f}" + ("" if clean(calls[n][1]) else f" (others used {calls[n][1]:.2f} cores)")
                for n in names))
    paired = len(clean_rounds) >= rounds
    kept: dict[str, list[int]] = {}
    for n in names:
        kept[n] = clean_rounds[:rounds] if paired else sorted(
            sorted(range(len(collected)), key=lambda i: collected[i][n][1] or 0.0)[:rounds])
    if info is not None:
        info.update({"rounds_run": len(collected), "clean_rounds": clean_rounds, "paired": paired,
                     "max_contention": max_contention, "kept": kept,
                     "load": {n: [None if c[n][1] is None else round(c[n][1], 3) for c in collected] for n in names}})
    return {n: [collected[i][n][0] for i in kept[n]] for n in names}


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "mean": statistics.fmean(samples), "samples": list(samples)}


def ratio(a: list[float], b: list[float], rounds_a: list[int] | None = None,
          rounds_b: list[int] | None = None) -> dict[str, float]:
    """Ratio of medians a/b, plus the median and min-max of the per-round ratios over the
    rounds both kept (``rounds_a``/``rounds_b``: the round index of each sample, from
    :func:`alternate`'s ``info["kept"]``; default: samples are paired in order)."""
    if rounds_a is None or rounds_b is None:
        per_round = [x / y for x, y in zip(a, b)]
    else:
        tb = dict(zip(rounds_b, b))
        per_round = [x / tb[r] for r, x in zip(rounds_a, a) if r in tb] or [statistics.median(a) / statistics.median(b)]
    return {"median_ratio": statistics.median(a) / statistics.median(b),
            "round_ratio_median": statistics.median(per_round), "paired_rounds": len(per_round),
            "round_ratio_min": min(per_round), "round_ratio_max": max(per_round)}


class Gemm:
    """A fixed-shape GEMM (default 1024 x 768 @ 768 x 3072), ``reps`` times per call: the
    in-process reference rate of the machine."""

    def __init__(self, m: int = 1024, k: int = 768, n: int = 3072, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", reps: int = 10, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        self.out = torch.empty(m, n, device=device, dtype=dtype)
        self.reps, self.shape = reps, (m, k, n)
        self.flops = 2.0 * m * k * n * reps

    def __call__(self) -> None:
        for _ in range(self.reps):
            torch.mm(self.a, self.b, out=self.out)


# --------------------------------------------------------------------------- FLOPs
def _lora_linear_cls():
    try:
        from cola import LoRALinear
        return LoRALinear
    except Exception:  # pragma: no cover - cola is always importable in this repo
        return None


class FlopCounter:
    """Counts a step's matmul FLOPs from forward hooks (see the module docstring for the formula).

    Use as a context manager around one training step, then read :attr:`total` (forward +
    backward), :attr:`forward`, :attr:`backward`. Attention is added from the model config
    per forward call of the model (sequence length from the input).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.forward = 0.0
        self.backward = 0.0
        self.attention = 0.0  # the attention part of forward + backward
        self.handles: list[Any] = []

    def _linear_hook(self, module, inputs, output):
        x = inputs[0]
        n = x.numel() // module.in_features
        f = 2.0 * n * module.in_features * module.out_features
        self.forward += f
        if torch.is_grad_enabled():
            self.backward += f * (int(x.requires_grad) + int(module.weight.requires_grad))

    def _lora_hook(self, module, inputs, output):
        x = inputs[0]
        n = x.numel() // module.in_features
        r, fin, fout = module.rank, module.in_features, module.out_features
        self.forward += 2.0 * n * r * (fin + fout)
        if torch.is_grad_enabled():
            a_tr, b_tr, x_rg = module.lora_A.requires_grad, module.lora_B.requires_grad, x.requires_grad
            self.backward += 2.0 * n * r * (fout * (int(b_tr) + int(a_tr or x_rg)) + fin * (int(a_tr) + int(x_rg)))

    def _model_hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        b, s = ids.shape[0], ids.shape[1]
        cfg = self.model.config
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        f = 2.0 * b * s * s * heads * head_dim * layers
        self.forward += f
        self.attention += f
        if torch.is_grad_enabled():
            self.backward += 2 * f
            self.attention += 2 * f

    def __enter__(self) -> "FlopCounter":
        lora_cls = _lora_linear_cls()
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear_hook))
            elif lora_cls is not None and isinstance(m, lora_cls):
                self.handles.append(m.register_forward_hook(self._lora_hook))
        self.handles.append(decoder_of(self.model).register_forward_hook(self._model_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def total(self) -> float:
        return self.forward + self.backward


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (the module that sees input_ids): OPT's ``model.decoder``,
    Llama's ``model``; looks through PEFT wrappers."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    body = getattr(m, "model", m)
    return getattr(body, "decoder", body)


def count_step_flops(model: nn.Module, step: Callable[[], Any]) -> float:
    """Run ``step`` once with hooks; its forward + backward matmul FLOPs."""
    with FlopCounter(model) as counter:
        step()
    return counter.total


# --------------------------------------------------------------------------- memory
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_TOP_PAD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def rss_bytes() -> int:
    return 1024 * _status_kib("VmRSS")


def hwm_bytes() -> int:
    return 1024 * _status_kib("VmHWM")


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS; False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RSSSampler:
    """Fallback when VmHWM cannot be reset: a thread polling VmRSS every ``interval`` seconds
    (torch releases the GIL in its kernels, so the thread runs during them). It can miss a
    spike shorter than the interval."""

    def __init__(self, interval: float = 0.0005):
        import threading
        self.interval, self.peak = interval, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


class PeakMemory:
    """Peak memory of a block, above the memory in use when it starts.

    CPU: RSS high-water mark after a reset (method ``"vmhwm-reset"``; see the module
    docstring: needs :data:`MALLOC_ENV` in the process's environment to be exact), or a
    polling thread where the kernel refuses the reset (``"rss-sampler"``). CUDA:
    ``max_memory_allocated`` (``"cuda-allocator"``). Attributes after the block: ``start``
    (bytes in use at entry), ``peak`` (absolute), ``delta`` (peak - start), ``method``.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.start = self.peak = self.delta = 0
        self.method = "cuda-allocator" if self.cuda else "vmhwm-reset"
        self._sampler: _RSSSampler | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = rss_bytes()
            if not reset_hwm():
                self.method = "rss-sampler"
                self._sampler = _RSSSampler()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            self.peak = self._sampler.stop()
        else:
            self.peak = hwm_bytes()
        self.delta = self.peak - self.start


def run_child(module: str, args: list[str], timeout: float = 600, malloc_env: bool = True) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process; it must print one JSON object as its
    last stdout line. Returns it (or ``{"error": ...}``)."""
    env = dict(os.environ)
    if malloc_env:
        env.update(MALLOC_ENV)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"no JSON result; stdout tail: {proc.stdout[-500:]}"}


# --------------------------------------------------------------------------- output
def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "argv": sys.argv,
    }
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        info["cpu"] = m.group(1) if m else None
    except OSError:
        info["cpu"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        root = Path(__file__).resolve().parent.parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=root, timeout=10).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


def write_json(data: dict[str, Any], name: str, output: str | Path | None = None) -> Path:
    """Write ``data`` (plus ``environment``) as JSON; default ``benchmarks/results/<name>.json``."""
    path = Path(output) if output else RESULTS_DIR / f"{name}.json"
    return cola.io.write_json(path, {"benchmark": name, "environment": environment(), **data})


def settings_of(args) -> dict[str, Any]:
    """A benchmark's settings as recorded in its result: its arguments less the output options."""
    return {k: v for k, v in vars(args).items() if k not in ("output", "quiet")}


def publish(result: dict[str, Any], name: str, args, render, target_digits: int | None = None) -> dict[str, Any]:
    """Write ``result`` (:func:`write_json` to ``args.output``), print ``render(result)`` and, with
    ``target_digits``, the table of ``result["targets"]``; return ``result``."""
    path = write_json(result, name, args.output)
    print(render(result))
    if target_digits is not None:
        print()
        print(markdown_table(["target", "measured", "met"],
                             [[k, f"{v['value']:.{target_digits}f}", "yes" if v["met"] else "NO"]
                              for k, v in result["targets"].items()]))
    print(f"\nwritten: {path}")
    return result


markdown_table = cola.io.markdown_table



def fmt_ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def fmt_range(s: dict[str, Any], scale: float = 1e3, digits: int = 1) -> str:
    """``median [min-max]`` of a :func:`summary`, scaled (default: seconds -> ms)."""
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def mib(n: float) -> float:
    return n / 2**20


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--output", default=None, help=f"JSON path (default benchmarks/results/{name}.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--max-contention", type=float, default=0.1,
                        help="re-run a timing round when other processes used more cores than this "
                             "(see common.alternate); a large value disables it")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def logger(args) -> Callable[[str], None] | None:
    if getattr(args, "quiet", False):
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
