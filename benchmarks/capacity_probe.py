"""Capacity probe: is LoRA at a low rank clearly below full fine-tuning on held-out domain perplexity?

One run per invocation (a fresh model each time), appended as one JSON line to ``--out``:
continued pretraining of the embedded SmolLM2-135M on a corpus (the language-model loss on
packed blocks, :mod:`cola.llm.tasks.blocks`), then held-out domain metrics (test documents fixed by
``--test-seed``) and the same metrics on the reference text (forgetting = rise over zero-shot).

Methods: ``zero-shot`` (evaluation only), ``lora`` (one LoRA link through :class:`cola.Chain`,
rank ``--rank``, alpha = ``--alpha-ratio`` x rank, on ``--targets``), ``full`` (AdamW over every
parameter). Both use AdamW (no weight decay) and a linear decay of the LR to 0 over ``--steps``,
no warm-up, float32, the same batches (``cola.llm.tasks.blocks.batch_indices`` with the run's seed).

Run it with one intra-op thread on a shared machine (``OMP_NUM_THREADS=1``; ``--threads``).
Seconds per step are the median over the steps after the first two.

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.capacity_probe --method lora --rank 2 --lr 2e-3 \\
        --steps 120 --batch 8 --block 64 --seed 0 --out /tmp/capacity/runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("zero-shot", "lora", "full", "time"), required=True,
                   help="'time': seconds per training step of LoRA (--rank) and full fine-tuning, "
                        "alternated in one process (--rounds rounds after 2 warm-up rounds)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--corpus", default="stdlib",
                   help="'stdlib' (the embedded corpus) or a path for cola.llm.tasks.corpus_sources.read_documents")
    p.add_argument("--files", default="*", help="glob for a corpus folder")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sample-by", default=None, help="document | paragraph | line (text files)")
    p.add_argument("--reference", default="tweets", help="'tweets' (embedded) or a path")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="alpha = ratio x rank (scaling alpha/r)")
    p.add_argument("--targets", default="all-linear", help="'all-linear', 'qv' or comma-separated names")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--n-test-blocks", type=int, default=128)
    p.add_argument("--n-val-blocks", type=int, default=32)
    p.add_argument("--n-ref-blocks", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-at", default="", help="comma-separated extra steps to score the test blocks at")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--out", default="/tmp/capacity/runs.jsonl")
    return p.parse_args(argv)


def load_documents(spec: str, args: argparse.Namespace, reference: bool = False):
    from cola.llm.tasks import corpus_sources

    if spec == "stdlib":
        return corpus_sources.embedded_corpus()
    if spec == "tweets":
        return corpus_sources.embedded_reference()
    return corpus_sources.load_corpus(spec, files=args.files if not reference else "*", text_field=args.text_field,
                         sample_by=args.sample_by)


def time_steps(args: argparse.Namespace) -> dict:
    """Median seconds per training step of LoRA and full fine-tuning, alternated (A B, B A, ...)."""
    import cola
    from cola.llm.tasks import blocks as C
    from cola.llm import load_model

    tokenizer = load_model("embedded", device="cpu")[1]
    domain = load_documents(args.corpus, args)
    blocks = C.pack_documents(C.encode_documents(domain.documents[:400], tokenizer), args.block,
                              tokenizer.eos_token_id)
    steppers = {}
    lora_model = load_model("embedded", device="cpu")[0].train()
    targets = ALL_LINEAR if args.targets == "all-linear" else args.targets.split(",")
    cola.inject_lora(lora_model, targets, rank=args.rank, alpha=args.alpha_ratio * args.rank)
    chain = cola.Chain(lora_model, lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0),
                       cola.ChainConfig(total_steps=10_000, links=1))
    full_model = load_model("embedded", device="cpu")[0].train()
    full_opt = torch.optim.AdamW(full_model.parameters(), lr=1e-6, weight_decay=0.0)

    def lora_step(batch):
        C.lm_loss(lora_model, batch).backward()
        chain.step()
        chain.zero_grad()

    def full_step(batch):
        C.lm_loss(full_model, batch).backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    steppers = {f"lora-r{args.rank}": lora_step, "full": full_step}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_ in range(2 + args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            batch = blocks.input_ids[C.batch_indices(blocks.n_blocks, args.batch, round_, args.seed)]
            t0 = time.perf_counter()
            steppers[name](batch)
            if round_ >= 2:
                times[name].append(time.perf_counter() - t0)
    record = {"label": args.label, "method": "time", "batch": args.batch, "block": args.block,
              "rank": args.rank, "targets": args.targets, "threads": args.threads,
              "load_avg_after": os.getloadavg(),
              **{f"{name}_s_per_step": statistics.median(ts) for name, ts in times.items()},
              **{f"{name}_all": ts for name, ts in times.items()}}
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.method == "time":
        return time_steps(args)
    import cola
    from cola.llm.tasks import blocks as C
    from cola.llm import load_model

    start = time.perf_counter()
    model, tokenizer = load_model("embedded", device="cpu")
    domain = load_documents(args.corpus, args)
    reference = load_documents(args.reference, args, reference=True)
    splits = C.prepare_corpus(domain.documents, tokenizer, args.block, args.n_val_blocks, args.n_test_blocks,
                              seed=args.seed, test_seed=args.test_seed)
    ref_blocks = C.prepare_reference(reference.documents, tokenizer, args.block, args.n_ref_blocks)
    setup_s = time.perf_counter() - start
    record: dict = {"label": args.label, "method": args.method, "corpus": args.corpus, "rank": args.rank,
                    "alpha": args.alpha_ratio * args.rank, "targets": args.targets, "lr": args.lr,
                    "steps": args.steps, "batch": args.batch, "block": args.block, "seed": args.seed,
                    "test_seed": args.test_seed, "threads": args.threads,
                    "corpus_info": domain.info.to_dict(), "reference_info": reference.info.to_dict(),
                    "split": {k: {a: b for a, b in v.items() if a != "documents"} if isinstance(v, dict) else v
                              for k, v in splits.summary().items()},
                    "test_documents": list(splits.test.documents), "python": platform.python_version(),
                    "torch": torch.__version__, "setup_s": setup_s}
    step_times: list[float] = []
    losses: list[float] = []
    curve: list[dict] = []
    eval_at = {int(s) for s in args.eval_at.split(",") if s.strip()}
    if args.method != "zero-shot":
        torch.manual_seed(args.seed)
        if args.method == "lora":
            targets = ALL_LINEAR if args.targets == "all-linear" else (
                ["q_proj", "v_proj"] if args.targets == "qv" else args.targets.split(","))
            cola.inject_lora(model, targets, rank=args.rank, alpha=args.alpha_ratio * args.rank)
            chain = cola.Chain(model, lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
                               cola.ChainConfig(total_steps=args.steps, links=1, lr_schedule="linear",
                                                seed=args.seed))
            trainable = sum(p.numel() for p in chain.params)
            step_fn = chain.step
            zero = chain.zero_grad
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1 - t / args.steps))
            trainable = sum(p.numel() for p in params)

            def step_fn(loss):
                optimizer.step()
                scheduler.step()

            def zero():
                optimizer.zero_grad(set_to_none=True)
        record["trainable_params"] = trainable
        model.train()
        for step in range(args.steps):
            t0 = time.perf_counter()
            batch = splits.train.input_ids[C.batch_indices(splits.train.n_blocks, args.batch, step, args.seed)]
            loss = C.lm_loss(model, batch)
            loss.backward()
            step_fn(loss.detach())
            zero()
            step_times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if (step + 1) % 10 == 0:
                print(f"step {step + 1} loss {statistics.mean(losses[-10:]):.4f} "
                      f"{statistics.median(step_times[2:] or step_times):.2f} s/step", flush=True)
            if step + 1 in eval_at:
                curve.append({"step": step + 1, **C.evaluate_corpus(model, splits.test, args.eval_batch)})
                model.train()
    t0 = time.perf_counter()
    record["test"] = C.evaluate_corpus(model, splits.test, args.eval_batch)
    record["reference"] = C.evaluate_corpus(model, ref_blocks, args.eval_batch)
    # the same without document boundaries (EOS and the token after it): forgetting of the text
    # itself, not of the packing format the run adapts to
    record["reference_inner"] = C.evaluate_corpus(model, ref_blocks, args.eval_batch,
                                                  boundary_id=tokenizer.eos_token_id)
    record["eval_s"] = time.perf_counter() - t0
    record["s_per_step"] = statistics.median(step_times[2:]) if len(step_times) > 2 else None
    record["train_loss_every_10"] = [statistics.mean(losses[i:i + 10]) for i in range(0, len(losses), 10)]
    record["curve"] = curve
    record["wall_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("label", "method", "rank", "lr", "steps", "seed", "test", "reference",
                                               "reference_inner", "s_per_step", "wall_s")}), flush=True)
    return record


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
