"""``cola train`` as a library function: :func:`run_experiment`, every (seed, method) of the settings.

For each seed and each method (``lora``, ``cola``, ``full``) one *run*: fresh model, LoRA
injected (not for ``full``), AdamW, the chain ties its knots by itself; the validation split is
scored zero-shot and after every link (the COLA curve), the test split zero-shot and at the end.
Every method of a comparison sees the same data, seeds, batches and number of optimizer steps.
Results (``results.json``, ``results.csv``, ``results.md``, plots; :mod:`cola.llm.report`) and
per-run outputs (``runs/<method>-seed<k>/``: ``run.json``, the adapters, optionally the merged
model; :mod:`cola.llm.artifacts`) go to the output folder.

``resume=True`` skips the runs that completed and continues the others from their checkpoints
(:mod:`cola.llm.loop`). Under torchrun / ``accelerate launch`` every rank runs this function
(:mod:`cola.llm.parallel`); rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

import cola
import cola.distributed as cd
from cola.errors import ConfigError
from cola.io import make_folder, write_json
from cola.llm import divergence, report, stopping
from cola.llm.artifacts import save_outputs
from cola.llm.evaluation import zero_shot
from cola.llm.host import Loader, ModelHost, default_loader, meta_model, plan_settings
from cola.llm.lock import FolderLock
from cola.llm.loop import FullFineTuning, Run, RunStopped, StepBudget, Training, resume, save_checkpoint
from cola.llm.parallel import check_global_batches, describe, on_main, start_distributed
from cola.llm.plan import FLOPS_FORMULA, build_plan
from cola.llm.records import RunRecord, primary_metric
from cola.llm.settings import RUNTIME_FIELDS, TrainSettings, default_of
from cola.llm.tasks.kind import Inputs
from cola.llm.tasks.kinds import kind_of
from cola.llm.tasks.references import ForgettingTexts, StartPoint
from cola.llm.tracking import Naming, open_run

log = logging.getLogger(__name__)

RESULTS_VERSION = 1


@dataclass
class Experiment:
    """The shared state of one ``run_experiment`` call."""

    settings: TrainSettings
    out: Path
    inputs: Inputs
    host: ModelHost
    evaluate: Callable
    budget: StepBudget
    progress: bool
    plan: dict[str, Any]
    naming: Naming          #: how its runs are named for the trackers (``--report-to``)


def run_experiment(settings: TrainSettings, loader: Loader | None = None, progress: bool = False,
                   naming: Naming | None = None) -> dict[str, Any]:
    """Train and evaluate every (seed, method) of ``settings``; return the results.

    Args:
        settings: the run's :class:`TrainSettings` (automatic defaults are resolved here).
        loader: ``loader() -> (model, tokenizer)`` giving a fresh base model on each call;
            default: :func:`cola.llm.load_model` of ``settings.model``.
        progress: show tqdm progress bars (the CLI does; a library call logs instead).
        naming: the trackers' name and folder of the runs (``--report-to``); default: ``settings.name``
            (else the output folder's name) and ``<output folder>/tracking``.

    Returns:
        The results dict written to ``results.json`` (see :mod:`cola.llm.report`); with
        ``dry_run`` the plan only. ``results["status"]`` is ``"complete"``, or ``"stopped"``
        when ``stop_after`` ended the invocation early (continue with ``resume=True``).
    """
    started = time.time()
    settings = settings.resolved()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = None if settings.dry_run else start_distributed(settings)
    out = on_main(lambda: output_dir(settings))  # a default name holds the time: rank 0's
    host = None
    if settings.dry_run and loader is None:
        model, tokenizer = meta_model(settings)
    else:
        fsdp = settings.fsdp and device is not None
        if settings.fsdp and not fsdp and not settings.dry_run:
            log.warning("fsdp: this is a single process (not started by torchrun or accelerate launch): "
                        "the model is not sharded")
        host = ModelHost(loader or default_loader(settings, device, fsdp), device, fsdp, settings)
        model, tokenizer = host.get()
    kind = kind_of(settings.task)
    inputs = kind.inputs(settings, model, tokenizer)
    sizes = kind.sizes(settings, inputs)
    plan = build_plan(plan_settings(settings, host.adapter if host is not None else None), model, inputs.task,
                      inputs.splits, sizes, inputs.max_length, inputs.total_steps)
    if settings.dry_run:
        return {"dry_run": True, "settings": settings.to_dict(), "plan": plan, "flops_formula": FLOPS_FORMULA}
    world = cd.world_size() if device is not None else 1
    if world > 1:
        check_global_batches(settings, {s: len(inputs.splits[s].train) for s in settings.seeds}, world)
    main = cd.is_main_process()
    evaluate = kind.evaluator(settings, tokenizer, inputs, progress and main,
                              StartPoint(settings) if kind.keeps else None)
    naming = naming or Naming(settings.name or out.name, out / "tracking")
    exp = Experiment(settings, out, inputs, host, evaluate, StepBudget(settings.stop_after), progress and main, plan,
                     naming)
    with output_held(settings, out):  # rank 0 locks and prepares the folder; released at the end, on errors, signals
        return _run_all(exp, device, world, started)


def _run_all(exp: Experiment, device: torch.device | None, world: int, started: float) -> dict[str, Any]:
    """``run_experiment`` once its output folder is held: zero-shot scores, every run, the results files."""
    settings, out, plan, host, inputs, evaluate = exp.settings, exp.out, exp.plan, exp.host, exp.inputs, exp.evaluate
    log.info("output folder: %s", out)
    results = _results_header(settings, out, plan, started)
    if device is not None:
        results["distributed"] = describe(device, host.fsdp)
        log.info("data-parallel over %d ranks (%s, %s%s); global micro-batch %d, %s per rank", world,
                 results["distributed"]["backend"], device.type, ", FSDP" if host.fsdp else "", settings.batch_size,
                 "/".join(map(str, sorted(set(cd.shard_sizes(settings.batch_size, world)), reverse=True))))
    if inputs.kept is not None:   # before anything trains: where the model starts (the KL's reference point)
        inputs.kept = remember_start(evaluate.start, host, settings, inputs)
    scores = zero_shot(evaluate, host, out, inputs.splits)
    results["zero_shot"] = {"test": scores["test"], "validation": {str(s): v for s, v in scores["validation"].items()}}
    try:
        for seed in settings.seeds:
            for method in settings.methods:
                results["runs"].append(run_one(exp, method, seed, scores).to_dict())
    except RunStopped as stop:
        results["status"] = "stopped"
        results["stopped"] = str(stop)
        log.info("%s; continue with --resume (output folder %s)", stop, out)
    results["nonfinite_steps"] = {f"{r['method']}-seed{r['seed']}": r.get("nonfinite_steps", 0)
                                  for r in results["runs"]}  # skipped steps (non-finite loss/gradient)
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    results["seconds"] = time.time() - started
    report.finalize(results)
    files = on_main(lambda: report.write_all(results, out, plots=settings.plots))  # written when any rank returns
    results.setdefault("files", dict(files))
    return results


def remember_start(start: StartPoint, host: ModelHost, settings: TrainSettings, inputs: Inputs) -> ForgettingTexts:
    """The starting model's distributions on every reference text of ``inputs`` (validation, test, the other
    references) and, for ``--replay-loss kl``, on the replay pool, computed once on the base model before any
    run trains (after a knot the frozen weights are no longer the start). Returns the forgetting texts with the
    replay pool's start set."""
    model, _ = host.sharded_base(settings) if host.fsdp else host.get()
    t0 = time.perf_counter()
    # in one process (a sweep) they are kept for the next experiment on the same weights; not under torchrun
    weights = None if cd.is_distributed() else divergence.weights_fingerprint(model)
    for split in inputs.splits.values():
        for evalset in (split.validation, split.test):
            start.compute(model, evalset.reference, weights)
            for blocks in (getattr(evalset, "more", None) or {}).values():
                start.compute(model, blocks, weights)
    kept = inputs.kept
    if kept.replay is not None and kept.replay.loss == "kl":
        kept = replace(kept, replay=kept.replay.with_start(start.compute(model, kept.replay.blocks, weights)))
    log.info("the starting model's distributions on the reference%s in %.1f s",
             " and the replay pool" if kept.replay is not None and kept.replay.loss == "kl" else "",
             time.perf_counter() - t0)
    if host.fsdp:
        host.restore()
    return kept

def _results_header(settings: TrainSettings, out: Path, plan: dict[str, Any], started: float) -> dict[str, Any]:
    return {
        "version": RESULTS_VERSION, "cola_version": cola.__version__, "versions": report.versions(),
        "command": " ".join(sys.argv) if sys.argv else None, "output_dir": str(out),
        "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "settings": settings.to_dict(), "plan": plan, "flops_formula": FLOPS_FORMULA, "runs": [],
        "status": "complete",
    }


def output_dir(settings: TrainSettings) -> Path:
    """``settings.output_dir``, or ``runs/<name>`` (default name: methods, task and the time)."""
    if settings.output_dir:
        return Path(settings.output_dir)
    name = settings.name or f"{'-'.join(settings.methods)}-{settings.task}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path("runs") / name


@contextmanager
def output_held(settings: TrainSettings, out: Path):
    """While the block runs: rank 0 holds the output folder's lock (:mod:`cola.llm.lock`; two processes
    never write one run) and has prepared the folder (:func:`prepare_output`), and SIGTERM / SIGINT stop
    the run after its current step (:mod:`cola.llm.stopping`). The lock is released at the end, on an
    error and on a signal."""
    # --resume continues a run whose process was killed: its provably stale lock is taken over (one warning)
    lock = FolderLock(out, "cola train", settings.take_over_lock, take_stale=settings.resume)

    def prepare() -> None:
        lock.acquire()
        try:
            prepare_output(settings, out)
        except BaseException:
            lock.release()
            raise

    with stopping.graceful():
        on_main(prepare)
        try:
            yield
        finally:
            lock.release()   # a no-op on the ranks that do not hold it


def prepare_output(settings: TrainSettings, out: Path) -> None:
    """A new folder with ``settings.json``, or (``resume``) a check that the saved settings are these."""
    saved_path = out / "settings.json"
    if settings.resume:
        if not saved_path.is_file():
            raise ConfigError(f"resume: {out} holds no run to resume (no settings.json)")
        saved = json.loads(saved_path.read_text())
        current = settings.to_dict()
        # a setting the saved run predates had its default then (settings are added with a neutral default)
        differing = [f"{k} (saved {saved.get(k, default_of(k))!r}, now {current[k]!r})" for k in current
                     if k not in RUNTIME_FIELDS and saved.get(k, default_of(k)) != current[k]]
        if differing:
            raise ConfigError([f"resume: the settings differ from the run in {out}:"] + differing)
        return
    if saved_path.is_file():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    settings.save(saved_path)


# ============================================================================ one run

def run_one(exp: Experiment, method: str, seed: int, scores: dict[str, Any]) -> RunRecord:
    """Train (or continue, or skip when complete) the run of ``method`` and ``seed``; its record."""
    key = f"{method}-seed{seed}"
    run_dir = exp.out / "runs" / key
    done = on_main(lambda: _completed(run_dir))  # rank 0 reads and decides; every rank follows
    if done is not None:
        log.info("%s: already complete, skipped", key)
        return RunRecord.from_dict(done)
    signal = stopping.from_flags(cd.any_over_ranks(stopping.flags()))  # a signal since the last step, on any rank
    if signal:
        raise stopping.SignalStop(signal, f"{key}: stopped by {stopping.name(signal)} before it started")
    start = time.perf_counter()
    run = start_run(exp, method, seed, run_dir, scores)
    if exp.settings.resume and on_main(run.checkpoint.is_file):
        resume(run)
    try:
        with tracked(exp, run):
            Training(exp.settings, run, exp.evaluate, exp.budget, exp.progress).train()
            finish_run(exp, run, run_dir, scores)
    finally:
        exp.host.restore()
    metric = primary_metric(exp.settings.to_dict())
    log.info("%s: test %s %.4f (zero-shot %.4f) in %.0f s", key, metric, run.record.test[metric],
             scores["test"][metric], time.perf_counter() - start)
    return run.record


def _completed(run_dir: Path) -> dict[str, Any] | None:
    record_path = run_dir / "run.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("status") == "complete":
            return record
    make_folder(run_dir, "run folder")
    return None


@contextmanager
def tracked(exp: Experiment, run: Run):
    """``run.tracking`` open (on rank 0; the settings, and a new run's zero-shot point, logged) while the
    block runs; closed after it, as failed when it raised (a stop for ``stop_after`` is no failure)."""
    if cd.is_main_process():
        config = {**exp.settings.to_dict(), "method": run.record.method, "seed": run.seed,
                  "chain_config": run.record.chain_config}
        start = run.trainer.step_count
        run.tracking = open_run(exp.settings.report_to, exp.naming, run.key, config, start)
        for point in run.record.curve if start == 0 else []:
            run.tracking.validation(point)
    try:
        yield
    except RunStopped:
        run.tracking.close()
        raise
    except BaseException:
        run.tracking.close(failed=True)
        raise
    run.tracking.close()


def start_run(exp: Experiment, method: str, seed: int, run_dir: Path, scores: dict[str, Any]) -> Run:
    """A fresh run of ``method``: the model (LoRA injected, or every weight trainable), its trainer
    (a chain, or full fine-tuning), and an empty record with the zero-shot point of the curve."""
    settings, key = exp.settings, f"{method}-seed{seed}"
    if exp.host.fsdp:
        exp.host.get()  # a fresh model for each run, loaded before the seed: LoRA draws as without FSDP
    torch.manual_seed(seed)
    total = exp.inputs.total_steps
    plan = exp.plan["methods"][method]
    if method == "full":
        model, tokenizer = exp.host.for_full()
        trainer = FullFineTuning(model, settings, total, key)
        trainable, lr, hint, config = trainer.trainable, settings.full_lr, f"--full-lr (now {settings.full_lr})", None
    else:
        exp.host.inject(settings)
        model, tokenizer = exp.host.get()
        config = settings.chain_config(method, total, seed)
        # on CUDA the fused AdamW: fastest, and it skips a non-finite step inside its kernel (found_inf)
        fused = next(model.parameters()).device.type == "cuda" or None
        trainer = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=settings.lr, weight_decay=settings.weight_decay,
                                                                fused=fused), config)
        cd.attach(trainer)  # ranks start alike (checked) and stay alike: every knot checked (no-op for one process)
        trainable, lr, hint = sum(p.numel() for p in trainer.params), settings.lr, f"--lr (now {settings.lr})"
    chain = trainer if config is not None else None
    record = RunRecord(
        method=method, seed=seed, total_steps=total, trainable_params=trainable,
        trainable_params_per_link=plan["trainable_params"], lr=lr, data=exp.inputs.splits[seed].sizes(),
        chain_config=config.to_dict() if config else None, knots=chain.planned_knots() if chain else [],
        ranks=chain.planned_ranks() if chain else [])
    if settings.eval_links:
        record.add_curve_point(0, 0, scores["validation"][seed])
    if settings.eval_every:
        record.add_trajectory_point(0, 0, scores["validation"][seed])
    return Run(key, model, tokenizer, trainer, exp.inputs.encoded[seed], exp.inputs.splits[seed], record,
               run_dir / "checkpoint.pt", seed, hint, objective=settings.objective,
               replay=exp.inputs.kept.replay if exp.inputs.kept is not None else None)


def finish_run(exp: Experiment, run: Run, run_dir: Path, scores: dict[str, Any]) -> None:
    """Final evaluation (validation after the last link, test), outputs, and the record on disk."""
    settings, record, chain = exp.settings, run.record, run.chain
    if settings.keep_checkpoints:  # the last step's state, before the final evaluation: killed after it, a resumed
        save_checkpoint(run)       # run evaluates once, as an uninterrupted one does (not the last link twice)
    t0 = time.perf_counter()
    links_done = (len(chain.history) + 1) if chain else 1
    if settings.eval_links or settings.eval_every:
        val = exp.evaluate(run.model, run.tokenizer, run.splits.validation,
                           f"{run.key} validation after link {links_done}")
        if settings.eval_links:
            record.add_curve_point(links_done, record.steps_taken, val)
            run.tracking.validation(record.curve[-1])
        if settings.eval_every:
            record.add_trajectory_point(record.steps_taken, links_done - 1, val)
    record.test = exp.evaluate(run.model, run.tokenizer, run.splits.test, f"{run.key} test")
    if "reference_loss" in record.test:  # corpus and facts: forgetting, the reference loss's rise over zero-shot
        record.test["forgetting"] = record.test["reference_loss"] - scores["test"]["reference_loss"]
        before = scores["test"].get("more_references") or {}
        for source, now in (record.test.get("more_references") or {}).items():
            if source in before:
                now["forgetting"] = now["loss"] - before[source]["loss"]
    run.tracking.test(record.test, record.total_steps)
    record.zero_shot = {"test": scores["test"], "validation": scores["validation"].get(run.seed)}
    record.seconds["eval"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    record.outputs = save_outputs(settings, run_dir, run.model, run.tokenizer, chain)
    record.seconds["export"] = time.perf_counter() - t0
    synced = on_main(lambda: record.to_dict())  # rank 0's timings and output paths on every rank
    record.seconds, record.outputs = synced["seconds"], synced["outputs"]
    if chain is not None:
        record.knot_reports = [r.to_dict() for r in chain.history]
        record.nonfinite_steps = chain.nonfinite_steps
    record.status = "complete"
    record.seconds["total"] = sum(v for k, v in record.seconds.items() if k != "total")
    plan = exp.plan["methods"][record.method]
    record.flops = {"train": plan["train_flops"], "eval_estimate": plan.get("eval_flops")}
    main = cd.is_main_process()
    if settings.keep_checkpoints:
        record.outputs["checkpoint"] = str(run.checkpoint)
    if main:
        write_json(run_dir / "run.json", record.to_dict())
        if not settings.keep_checkpoints:  # only once the record is on disk: a disk full before keeps it to resume from
            run.checkpoint.unlink(missing_ok=True)
