"""The classification training step of ``cola train`` vs the usual full-logits path.

    python -m benchmarks.task                    # SmolLM2-135M-shaped, 8 x 64, LoRA r=8 on q,v

Both paths train copies of the same model (cola LoRA on q_proj, v_proj + AdamW) on the same 8
examples with single-token answers, and both run the transformer body on exactly
``batch x seq`` tokens:

* ``gathered`` (cola train): ``cola.llm.objective.training_loss(model, examples,
  "classification")``: the body's last hidden states, gathered at the one position per
  example that predicts the answer; the LM head and log-softmax run on those rows only; the
  loss is cross-entropy over the candidates' log-likelihoods. The prompt has ``seq`` tokens.
  (When ``cola.llm.objective`` is not importable, a local minimal implementation with the same
  computation is used; the JSON says which.)
* ``full-logits``: ``model(input_ids, attention_mask, labels=labels, use_cache=False).loss``:
  transformers' causal-LM loss with logits over the whole sequence (prompt of ``seq - 1`` tokens + the gold
  answer; labels -100 except the answer), i.e. the LM head and a vocabulary-wide softmax at
  every position.

The steps alternate, one at a time, in one process; reported: medians, min-max, the speed-up
(full-logits / gathered, ratio of medians) and the FLOPs each path executes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from . import common as C

NAME = "task"


def _local_objective():
    """Minimal stand-in of cola.llm.objective's single-token classification loss."""
    class EncodedExample:
        def __init__(self, context, candidates, label, truncated=0):
            self.context, self.candidates, self.label, self.truncated = tuple(context), candidates, label, truncated

    def training_loss(model, batch, loss="classification", pad_token_id=0, fast_path=True):
        device = next(model.parameters()).device
        ids = torch.tensor([ex.context for ex in batch], device=device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)[0]
        last = torch.tensor([len(ex.context) - 1 for ex in batch], device=device)
        rows = hidden[torch.arange(len(batch), device=device), last]
        logp = F.log_softmax(model.get_output_embeddings()(rows).float(), dim=-1)
        cand = torch.tensor([[c[0] for c in ex.candidates] for ex in batch], device=device)
        labels = torch.tensor([ex.label for ex in batch], device=device)
        return F.cross_entropy(logp.gather(1, cand), labels)

    return EncodedExample, training_loss


def objective():
    """(EncodedExample, training_loss, source): cola.llm.objective's when importable."""
    try:
        from cola.llm.objective import EncodedExample, training_loss
        return EncodedExample, training_loss, "cola.llm.objective.training_loss"
    except ImportError:
        return (*_local_objective(), "benchmarks.task local minimal implementation")


def make_examples(vocab: int, batch: int, seq: int, n_candidates: int, seed: int, EncodedExample):
    """``batch`` examples: a ``seq``-token prompt, ``n_candidates`` single-token answers, a label."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    cand_ids = torch.randint(4, vocab, (n_candidates,), generator=gen).tolist()
    labels = torch.randint(0, n_candidates, (batch,), generator=gen).tolist()
    examples = [EncodedExample(tuple(ids[i].tolist()), tuple((c,) for c in cand_ids), labels[i])
                for i in range(batch)]
    # The full-logits path: the same body length: prompt[:seq-1] + gold answer; loss on the answer only.
    full_ids = ids.clone()
    full_ids[:, -1] = torch.tensor([cand_ids[y] for y in labels])
    full_labels = torch.full_like(full_ids, -100)
    full_labels[:, -1] = full_ids[:, -1]
    full_batch = {"input_ids": full_ids, "attention_mask": torch.ones_like(full_ids), "labels": full_labels,
                  "use_cache": False}
    return examples, full_batch


def run(args, log) -> dict[str, Any]:
    EncodedExample, training_loss, source = objective()
    base = C.build_model(args.model or args.shape, seed=args.seed)
    examples, full_batch = make_examples(base.config.vocab_size, args.batch, args.seq, args.candidates,
                                         args.seed, EncodedExample)
    tasks, flops, losses = {}, {}, {}
    for name in ("gathered", "full-logits"):
        model, opt = C.setup_cola_lora(C.fresh_copy(base), C.targets(base, "qv"), rank=args.rank)
        if name == "gathered":
            step = C.train_step_fn(model, opt, examples, lambda m, b: training_loss(m, b, "classification"))
        else:
            step = C.train_step_fn(model, opt, full_batch)
        with C.FlopCounter(model) as counter:
            losses[name] = step()
        flops[name] = counter.total
        tasks[name] = step
    del base
    if log:
        log(f"task: {args.model or args.shape}, {args.batch} x {args.seq}, {args.warmup} warm-up + {args.rounds} rounds; "
            f"objective: {source}")
    timing: dict[str, Any] = {}
    samples = C.alternate(tasks, rounds=args.rounds, warmup=args.warmup, log=log, info=timing,
                          max_contention=args.max_contention)
    out: dict[str, Any] = {"objective": source, "paths": {}, "timing": timing}
    for name in tasks:
        s = C.summary(samples[name])
        out["paths"][name] = {**s, "flops_per_step": flops[name], "first_loss": losses[name],
                              "tokens_per_s": args.batch * args.seq / s["median"]}
    r = C.ratio(samples["full-logits"], samples["gathered"], timing["kept"]["full-logits"], timing["kept"]["gathered"])
    out["speedup"] = r
    v = r["median_ratio"]
    out["targets"] = {f"gathered >= 1.3x faster than full-logits ({args.batch} x {args.seq})": {"value": v, "met": v >= 1.3}}
    return out


def render(result: dict[str, Any]) -> str:
    rows = [[name, C.fmt_range(p), f"{p['tokens_per_s']:.0f}", f"{p['flops_per_step'] / 1e9:.1f}"]
            for name, p in result["paths"].items()]
    r = result["speedup"]
    table = C.markdown_table(["path", "ms/step median [min-max]", "tokens/s", "GFLOP/step"], rows)
    table += (f"\n\nspeed-up full-logits / gathered: {r['median_ratio']:.3f} (per-round "
              f"{r['round_ratio_min']:.3f}-{r['round_ratio_max']:.3f}); objective: {result['objective']}")
    table += "\n\n" + C.markdown_table(["target", "measured", "met"], [
        [k, f"{v['value']:.3f}", "yes" if v["met"] else "NO"] for k, v in result["targets"].items()])
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.task", description=__doc__.split("\n")[0])
    C.common_arguments(p, NAME)
    p.add_argument("--shape", default="smollm2-135m", help=f"random-init shape ({', '.join(C.SHAPES)})")
    p.add_argument("--model", default=None, help="a local model path instead of --shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.apply_threads(args)
    return C.publish({"settings": C.settings_of(args), **run(args, C.logger(args))}, NAME, args, render)


if __name__ == "__main__":
    main(sys.argv[1:])
