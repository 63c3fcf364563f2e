"""One LoRA layer, forward + backward: cola's ``LoRALinear`` vs PEFT's ``lora.Linear`` vs a
plain ``nn.Linear``, plus candidate forward variants of ``LoRALinear``.

    python -m benchmarks.layer                   # 768 x 768 (OPT-125m q_proj), 8 x 128 tokens

A diagnostic for :mod:`benchmarks.speed`: with the whole model around a layer, a difference
of a few percent in one layer is lost in the noise; here each variant runs ``--inner``
forward+backward passes per timed call, alternating variants, medians over ``--rounds``.

Variants of ``LoRALinear.forward`` (same parameters, same result up to rounding):

* ``cola``: the library's ``base(x) + (B(A(x)) * scaling)``: two elementwise passes over the
  output (the scaling multiply and the add), each in forward and in backward;
* ``cola-addmm``: ``addmm(base(x), A(x), (scaling * B)^T)``: the scaling goes on the small B
  (out x r) and the B-GEMM accumulates straight into the base output (beta = 1), so there is
  no elementwise pass over the output in forward and none in backward (addmm's gradient to its
  ``input`` is the incoming gradient itself);
* ``peft``: PEFT's layer (same structure as ``cola``);
* ``frozen``: the bare ``nn.Linear`` (no adapter), the floor.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import common as C

NAME = "layer"


def addmm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The proposed ``LoRALinear.forward``: scaling folded into B, B-GEMM accumulated into the base output."""
    out = self.base(x)
    h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
    scaled_B = self.lora_B * self.scaling
    if h.dtype != out.dtype or out.dim() < 2:
        return out + F.linear(h, scaled_B).to(out.dtype)
    return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_B.t()).view(out.shape)


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.q_proj = linear

    def forward(self, x):
        return self.q_proj(x)


def build_variants(fin: int, fout: int, rank: int, seed: int) -> dict[str, nn.Module]:
    import cola
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    base = _Holder(nn.Linear(fin, fout))
    variants: dict[str, nn.Module] = {}
    m = copy.deepcopy(base)
    cola.inject_lora(m, ["q_proj"], rank=rank, alpha=16)
    variants["cola"] = m
    m = copy.deepcopy(variants["cola"])
    layer = m.q_proj
    layer.forward = addmm_forward.__get__(layer)
    variants["cola-addmm"] = m
    variants["peft"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj"]))
    m = copy.deepcopy(base)
    m.requires_grad_(False)
    variants["frozen"] = m
    gen = torch.Generator().manual_seed(seed + 1)
    A = torch.randn(rank, fin, generator=gen) / fin ** 0.5
    B = torch.randn(fout, rank, generator=gen) * 0.01  # non-zero B: every path computes something real
    with torch.no_grad():
        for m in variants.values():
            for pname, p in m.named_parameters():
                if "lora_A" in pname:
                    p.copy_(A)
                elif "lora_B" in pname:
                    p.copy_(B)
    return variants


def _check(variants: dict[str, nn.Module], x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Largest difference from ``cola`` of the output and of the gradients of x, A and B."""
    def grads(m):
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(g)
        lora = {("A" if "lora_A" in n else "B"): p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return [y.detach(), x.grad.clone(), lora["A"], lora["B"]]
    ref = grads(variants["cola"])
    out = {name: max(float((a - b).abs().max()) for a, b in zip(grads(m), ref))
           for name, m in variants.items() if name != "frozen"}
    x.grad = None
    for m in variants.values():
        m.zero_grad(set_to_none=True)
    return out


def run(args, log) -> dict[str, Any]:
    variants = build_variants(args.fin, args.fout, args.rank, args.seed)
    x = torch.randn(args.batch, args.seq, args.fin, requires_grad=True)
    g = torch.randn(args.batch, args.seq, args.fout)
    check = _check(variants, x, g)

    def task(m):
        def f():
            for _ in range(args.inner):
                m(x).backward(g)
        return f

    timing: dict[str, Any] = {}
    samples = C.alternate({n: task(m) for n, m in variants.items()}, rounds=args.rounds, warmup=1, log=log,
                          info=timing, max_contention=args.max_contention)
    out: dict[str, Any] = {"timing": timing, "max_abs_diff_vs_cola (output, grads of x, A, B)": check, "variants": {}, "ratios": {}}
    for name in variants:
        out["variants"][name] = C.summary([t / args.inner for t in samples[name]])
    for a, b in (("cola", "peft"), ("cola-addmm", "peft"), ("cola-addmm", "cola"), ("peft", "frozen"), ("cola", "frozen")):
        out["ratios"][f"{a}/{b}"] = C.ratio(samples[a], samples[b], timing["kept"][a], timing["kept"][b])
    return out


def render(result: dict[str, Any]) -> str:
    rows = [[n, C.fmt_range(v, digits=2)] for n, v in result["variants"].items()]
    t = C.markdown_table(["variant", "ms per fwd+bwd median [min-max]"], rows)
    rows = [[k, f"{r['median_ratio']:.3f}", f"{r['round_ratio_min']:.3f}-{r['round_ratio_max']:.3f}"]
            for k, r in result["ratios"].items()]
    return t + "\n\n" + C.markdown_table(["ratio", "of medians", "per-round min-max"], rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer", description=__doc__.split("\n")[0])
    C.common_arguments(p, NAME)
    p.add_argument("--fin", type=int, default=768)
    p.add_argument("--fout", type=int, default=768)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--rounds", type=int, default=9)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.apply_threads(args)
    return C.publish({"settings": C.settings_of(args), **run(args, C.logger(args))}, NAME, args, render)


if __name__ == "__main__":
    main(sys.argv[1:])
