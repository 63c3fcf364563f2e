"""``cola sweep``: a grid of ``cola train`` runs, resumable, with paired comparisons to a baseline.

A sweep is a :class:`SweepSpec`: base settings (any ``cola train`` settings, e.g. model, task,
steps), a *grid* (axis -> list of values), the *seeds* and a *baseline*. Each grid cell is the
base settings with one value per axis; it runs once per seed (one ``cola train`` run each, in
``runs/<key>/seed<k>/``), and its score is compared, seed by seed, with the baseline's on the
same seeds and data (:mod:`cola.llm.stats`).

Axes are ``cola train`` setting names (``links``, ``lr``, ``epochs``, ``rank``, ``method``, ...),
``chain.<ChainConfig field>`` (``chain.reinit``, ...), or one option of a strategy
(``chain.rank_schedule_options.later_rank``). Short names: ``rank_schedule``, ``reinit``,
``optimizer_policy``, ``lr_policy``, ``merge_policy``, ``merge_rule``, ``lr_schedule`` and
``later_rank``.

The baseline is a set of overrides applied to each cell: ``{"method": "lora"}`` (the default)
compares every cell with one LoRA run that has the cell's other settings (its LR, its epochs);
``{"links": 1}`` does the same through the links axis. Runs are identified by what they compute:
two cells that train the same model the same way (a one-link chain is plain LoRA, whatever its
LR policy or rank schedule for later links) share one run, so the baseline is usually trained
once per value of the other axes, not once per cell.

Resuming: finished runs (``results.json`` with status complete) are skipped and half-finished
ones continue from their checkpoints; a grid may grow between invocations (new values, more
seeds) as long as the base settings stay the same. Zero-shot scores, which depend only on the
model and data, are computed once per seed and shared between runs.

Results (``results.json``, ``results.csv``, ``results.md`` and plots, see
:mod:`cola.llm.sweep.report`; the runs' own plots only with ``--plots``, no plot at all with
``--no-plots``) hold per cell: mean, std and n of the test score; the paired
difference with its confidence interval and verdict; the validation score after every link;
the mean training-loss curve with the knots; and the compute actually spent: trainable
parameters and training FLOPs per link and in all, the FLOPs ratio to the baseline (so "equal
compute" is checked, not assumed) and the wall time.
"""



from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import cola
from cola.errors import ConfigError
from cola.io import write_json
from cola.llm import report, stopping
from cola.llm.sweep import report as sweep_report, tuning as sweep_tuning
from cola.llm.experiment import run_experiment
from cola.llm.lock import FolderLock
from cola.llm.settings import TrainSettings
from cola.llm.sweep.cells import KEY_VERSION, Cell, build_cells, effective, run_key
from cola.llm.sweep.results import aggregate, read_json, run_status
from cola.llm.sweep.runs import Runner, units
from cola.llm.sweep.spec import SweepSpec, load_recipe, recipe_names

__all__ = ["SweepSpec", "load_recipe", "recipe_names", "run_sweep"]

log = logging.getLogger(__name__)

SWEEP_VERSION = 1

def run_sweep(spec: SweepSpec, out: str | Path, resume: bool = False, loader: Callable[[], Any] | None = None,
              progress: bool = False, max_runs: int | None = None, dry_run: bool = False,
              take_over_lock: bool = False, reuse_from: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run (or continue) the sweep ``spec`` in folder ``out`` and return its results.

    Args:
        spec: the sweep.
        out: its folder: ``sweep.json`` (the spec), ``runs/<key>/seed<k>/`` (one ``cola train``
            run each), ``zero_shot/``, and the results files.
        resume: continue the sweep in ``out`` (required when ``out`` already holds one); the grid
            and seeds may differ from the saved ones (grown or shrunk), the base settings may not.
        loader: ``loader() -> (model, tokenizer)``, a fresh base model per call (tests); default:
            the settings' model, loaded once and reused between runs.
        progress: progress bars (the CLI); else log lines.
        max_runs: run at most this many (cell, seed) runs in this invocation, then write the
            results so far (``status: "partial"``); for time-sliced jobs and tests.
        dry_run: plan only: every cell's run key, knots, ranks, trainable parameters and FLOPs.
        take_over_lock: take over the lock of the sweep folder that a process which no longer runs left
            behind (:mod:`cola.llm.lock`). The stale locks of its runs' folders (a run killed with the sweep)
            are taken over without it, the sweep holding its folder's lock; a live owner is never overridden.
        reuse_from: other sweep folders whose finished runs of the same key and seed are copied in instead of
            run again (the key hashes every setting a run computes with; ``reused.json`` in each copy, and
            ``reused`` in the results, say where it came from).

    Returns:
        The results dict (see :mod:`cola.llm.sweep.report`). While it runs, the sweep folder is locked
        (two sweeps never write one folder) and SIGTERM / SIGINT stop it after the current step of the
        current run (:class:`cola.llm.stopping.SignalStop`; continue with ``resume=True``).
    """
    started = time.time()
    out = Path(out)
    cells, extra = build_cells(spec)
    groups = sweep_tuning.candidates(spec, cells, extra) if spec.tune else {}
    if dry_run:
        return _plan(spec, cells, extra, out, groups)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("cola sweep runs in one process; under torchrun/accelerate launch each run would be "
                          "repeated by every rank. Run the sweep without a launcher (data-parallel sweeps are not "
                          "supported yet), or launch cola train per cell")
    runner = Runner(out, loader, progress, max_runs, [], tuple(Path(p) for p in reuse_from))
    with FolderLock(out, "cola sweep", take_over_lock, take_stale=resume), stopping.graceful():  # released at the end, on errors, signals
        _prepare(spec, out, resume)
        return _run_units(spec, out, runner, cells, extra, groups, started)


def _run_units(spec: SweepSpec, out: Path, runner: Runner, cells: list[Cell], extra: list[Cell],
               groups: dict[str, list[Cell]], started: float) -> dict[str, Any]:
    """The tuning runs, the sweep's runs and the results files, once the sweep folder is held."""
    failures = runner.failures
    untuned = (cells, extra)
    try:
        status = "complete"
        for round_ in range(spec.refine_rounds + 1) if groups else ():
            status = runner.run(sweep_tuning.tuning_units(spec, groups),
                                "tuning" if round_ == 0 else f"tuning (refinement {round_})")
            if status != "complete":
                break
            if round_ < spec.refine_rounds:   # candidates around each cell's best, from the runs so far
                records = {key: sweep_tuning.choose(spec, out, group) for key, group in groups.items()}
                groups = sweep_tuning.refine(spec, groups, records)
        cells, extra = _tuned(spec, out, *untuned, groups)
        # every cell chose (or found no candidate within the budget: it is reported so, and not run)
        chosen = all(c.tuning["chosen"] or c.tuning.get("over_budget") for c in [*cells, *extra]) if groups else True
        status = runner.run(units(spec, cells, extra), "sweep") if status == "complete" and chosen else "partial"
    except (KeyboardInterrupt, stopping.SignalStop):   # a signal: the checkpoint is written, the rest waits
        log.warning("sweep stopped; continue with: cola sweep --resume %s", out)
        raise
    if failures:
        status = "partial"
    results = _finish(spec, out, cells, extra, started, status, failures)
    sweep_report.log_summary(results)
    return results


def _tuned(spec: SweepSpec, out: Path, cells: list[Cell], extra: list[Cell],
           groups: dict[str, list[Cell]]) -> tuple[list[Cell], list[Cell]]:
    """The cells at their tuned values, each with its tuning record (as they were without tuning)."""
    if not groups:
        return cells, extra
    records = {key: sweep_tuning.choose(spec, out, group) for key, group in groups.items()}
    return sweep_tuning.apply(cells, extra, groups, records)


def _prepare(spec: SweepSpec, out: Path, resume: bool) -> None:
    saved_path = out / "sweep.json"
    saved = read_json(saved_path)
    if saved is not None and not resume:
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue (or grow) it, or another "
                          "--output-dir")
    if saved is None and resume:
        raise ConfigError(f"resume: {out} holds no sweep (no sweep.json)")
    if saved is not None:
        old = SweepSpec.from_dict(saved.get("spec", {}), str(saved_path))
        if old.settings != spec.settings:
            keys = sorted(set(old.settings) | set(spec.settings))
            diff = [f"{k} (saved {old.settings.get(k)!r}, now {spec.settings.get(k)!r})" for k in keys
                    if old.settings.get(k) != spec.settings.get(k)]
            raise ConfigError([f"resume: the base settings differ from the sweep in {out}:"] + diff)
        if old.grid != spec.grid or old.seeds != spec.seeds or old.baseline != spec.baseline:
            log.info("resume: the grid, seeds or baseline changed; finished runs are reused where they match")
    if saved is not None and saved.get("keys", 1) < KEY_VERSION:
        migrate_keys(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, {"version": SWEEP_VERSION, "keys": KEY_VERSION, "cola_version": cola.__version__,
                             "spec": spec.to_dict(), "updated": datetime.now().isoformat(timespec="seconds")})


def migrate_keys(out: Path) -> dict[str, str]:
    """Rename the run folders of a sweep written with an older :func:`run_key` to their keys now, computed from
    each run's own ``settings.json``; returns ``{old: new}``. A run (seed) already under its new key is kept
    there and the old copy left in place (logged); nothing is recomputed."""
    moved: dict[str, str] = {}
    for folder in sorted(p for p in (out / "runs").glob("*") if p.is_dir()) if (out / "runs").is_dir() else []:
        saved = next((p / "settings.json" for p in sorted(folder.glob("seed*")) if (p / "settings.json").is_file()),
                     None)
        if saved is None:
            continue
        new = run_key(TrainSettings.load(saved))
        if new == folder.name:
            continue
        target = out / "runs" / new
        for seed_dir in sorted(folder.glob("seed*")):
            if (target / seed_dir.name).exists():
                log.warning("migrating %s: %s/%s is also under its new key %s; the old copy is left in place", out,
                            folder.name, seed_dir.name, new)
                continue
            target.mkdir(parents=True, exist_ok=True)
            os.replace(seed_dir, target / seed_dir.name)
        if not any(folder.iterdir()):
            folder.rmdir()
        moved[folder.name] = new
    if moved:
        log.info("%s: %d run folders renamed to this version's run keys (chain values at their default no longer "
                 "make another run)", out, len(moved))
    return moved


def _plan(spec: SweepSpec, cells: list[Cell], extra: list[Cell], out: Path,
          groups: dict[str, list[Cell]]) -> dict[str, Any]:
    """The dry run: per cell its run key, knots, ranks, trainable parameters and FLOPs (for a tuned sweep:
    of the first candidate), and how many tuning candidates each cell has."""
    plans: dict[str, Any] = {}
    rows = []
    for cell in [*extra, *cells]:
        if cell.key not in plans:
            s = effective(cell.settings).replace(seeds=[spec.seeds[0]], dry_run=True)
            plan = run_experiment(s)["plan"]
            plans[cell.key] = {"total_steps": plan["total_steps"], **plan["methods"][s.method]}
        p = plans[cell.key]
        rows.append({"label": cell.label, "key": cell.key, "baseline": cell.baseline_label,
                     "is_baseline_only": cell.is_baseline_only, "method": p["method"], "links": p["links"],
                     "knots": p["knots"], "ranks": p["ranks"], "steps": p["total_steps"],
                     "trainable_params_per_link": p["trainable_params"], "train_flops_per_link": p["train_flops"],
                     "train_flops": sum(p["train_flops"]) if p["train_flops"] else None,
                     "tuning_candidates": len(groups.get(cell.key, [])) if groups else None})
    base_flops = {r["key"]: r["train_flops"] for r in rows}
    for cell, row in zip([*extra, *cells], rows):
        b = base_flops.get(cell.baseline_key) if cell.baseline_key else None
        row["flops_ratio"] = row["train_flops"] / b if row["train_flops"] and b else None
    runs = len({(c.key, s) for c in [*extra, *cells] for s in spec.seeds})
    tuning = len(sweep_tuning.tuning_units(spec, groups)) if groups else 0
    return {"dry_run": True, "spec": spec.to_dict(), "output_dir": str(out), "cells": rows, "runs": runs + tuning,
            "tuning_runs": tuning}



def _reused(out: Path) -> list[dict[str, Any]]:
    """The runs copied from other sweeps (``--reuse-runs``), in this and earlier invocations."""
    return [{"key": f.parent.parent.name, "seed": f.parent.name, "from": (read_json(f) or {}).get("from")}
            for f in sorted((out / "runs").glob("*/seed*/reused.json"))]


def _finish(spec: SweepSpec, out: Path, cells: list[Cell], extra: list[Cell], started: float, status: str,
            failures: list[dict[str, Any]]) -> dict[str, Any]:
    rows = aggregate(spec, out, cells, extra)
    reported = [c for c in [*extra, *cells] if not (c.tuning and c.tuning.get("over_budget"))]
    expected = len({(c.key, s) for c in reported for s in spec.seeds})
    finished = sum(1 for key in {c.key for c in reported} for s in spec.seeds
                   if run_status(out / "runs" / key / f"seed{s}") == "complete")
    if finished < expected:
        status = "partial"
    results = {
        "version": SWEEP_VERSION, "cola_version": cola.__version__, "versions": report.versions(), "status": status,
        "output_dir": str(out), "spec": spec.to_dict(), "runs_finished": finished, "runs_expected": expected,
        "failures": failures, "reused": _reused(out), "seconds_this_invocation": time.time() - started,
        "finished": datetime.now().isoformat(timespec="seconds"), "cells": rows,
    }
    # --no-plots (plots=False in the spec's settings) drops the sweep's plots too; by default only its runs' are off
    results["files"] = sweep_report.write_all(results, out, plots=spec.settings.get("plots", True) is not False)
    return results


