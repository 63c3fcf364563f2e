"""Results of ``cola train``: summary over seeds, the paired comparison, and the files.

:func:`finalize` adds ``summary`` (per method: mean, std and values over seeds of every test
metric and of the validation curve) and ``comparison`` (for two or more methods: the paired
gain of each method over the first, with an honest noise statement) to a results dict.
:func:`write_all` writes, into the output folder:

* ``results.json``: every figure and setting, versions, timings, trainable parameters, FLOPs;
* ``results.csv``: one row per run (method, seed);
* ``results.md``: the markdown table :func:`markdown` prints;
* the plots (:mod:`cola.llm.report_plots`, when matplotlib is installed): ``training_loss.png``
  (loss per step, knots marked); ``accuracy_per_link.png`` or, for the corpus task,
  ``perplexity_per_link.png`` and ``learn_forget.png`` (the validation score after each link, mean
  and std over seeds; perplexity against forgetting); ``knot_diagnostics.png`` (effective rank and
  norm of the accumulated update and each new link's overlap with the previous ones, per knot).
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import io
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from cola.io import atomic_write, write_json
from cola.llm import stats
from cola.llm.records import mean_loss, primary_metric
from cola.llm.report_plots import write_plots
from cola.llm.tasks.kinds import kind_of
from cola.llm.tasks.tables import complete_runs

log = logging.getLogger(__name__)

TEST_METRICS = ("accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm", "loss", "perplexity", "bits_per_byte",
                "reference_loss", "reference_perplexity", "forgetting", "recall", "token_accuracy", "answer_loss",
                "paraphrase_recall", "paraphrase_token_accuracy", "paraphrase_answer_loss", "reference_kl")
#: what a facts run's link did to the facts recalled before it (see cola.llm.tasks.facts_scoring.retention)
RETENTION = ("kept", "lost", "new", "kept_fraction")


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Add ``summary`` and ``comparison`` to ``results`` (in place) and return it."""
    methods = list(results["plan"]["methods"])
    summary = {}
    for method in methods:
        runs = complete_runs(results, method)
        if not runs:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for metric in TEST_METRICS:
            values = [r["test"][metric] for r in runs if metric in r["test"]]
            if values:
                entry[f"test_{metric}"] = stats.describe(values)
        curves = [r.get("curve", []) for r in runs]
        n_points = min((len(c) for c in curves), default=0)
        for name, metric in (("validation_curve", primary_metric(results["settings"])),
                             ("forgetting_curve", "forgetting")):
            points = [i for i in range(n_points) if all(metric in c[i]["validation"] for c in curves)]
            entry[name] = [{"after_link": curves[0][i]["after_link"], "step": curves[0][i]["step"],
                            **stats.describe([c[i]["validation"][metric] for c in curves])} for i in points]
        if n_points and all("kept" in c[-1]["validation"] for c in curves):  # the facts task: link by link
            entry["retention"] = [{"after_link": curves[0][i]["after_link"],
                                   **{k: stats.describe([c[i]["validation"][k] for c in curves
                                                         if c[i]["validation"][k] is not None]) for k in RETENTION}}
                                  for i in range(1, n_points)]
        trajectories = [r.get("trajectory") or [] for r in runs]
        n_traj = min((len(t) for t in trajectories), default=0)
        if n_traj:   # eval_every: the learn / forget trajectory, mean over seeds
            entry["trajectory"] = [
                {"step": trajectories[0][i]["step"],
                 **{m: stats.describe([t[i]["validation"][m] for t in trajectories])
                    for m in (primary_metric(results["settings"]), "forgetting", "reference_kl")
                    if all(t[i]["validation"].get(m) is not None for t in trajectories)}} for i in range(n_traj)]
        finals = [mean_loss(r["train_loss"][-10:]) for r in runs if r["train_loss"]]
        entry["final_train_loss"] = stats.describe([v for v in finals if v is not None])
        entry["train_seconds"] = stats.describe([r["seconds"]["train"] for r in runs])
        entry["eval_seconds"] = stats.describe([r["seconds"]["eval"] for r in runs])
        entry["trainable_params"] = runs[0]["trainable_params"]
        summary[method] = entry
    results["summary"] = summary
    results["comparison"] = compare(results, methods) if len(methods) > 1 else None
    return results


def compare(results: dict[str, Any], methods: list[str], confidence: float = 0.95) -> dict[str, Any]:
    """Paired comparison of each method with the first one, seed by seed, as ``cola sweep`` does it.

    Per method: the per-seed differences (method - baseline) of the primary test metric, their
    mean, std and ``confidence`` Student-t interval, and the verdict (:func:`cola.llm.stats.verdict`:
    ``better`` / ``worse`` when the interval excludes 0, ``within noise`` when it covers it, ``no
    interval`` with a single seed).
    """
    base = methods[0]
    metric = primary_metric(results["settings"])
    by_seed = {m: {r["seed"]: r for r in complete_runs(results, m)} for m in methods}
    out: dict[str, Any] = {"baseline": base, "metric": metric, "rule": results["settings"].get("eval_rule"),
                           "higher_is_better": stats.higher_is_better(metric), "gains": {}}
    for method in methods[1:]:
        seeds = sorted(set(by_seed[base]) & set(by_seed[method]))
        if not seeds:
            continue
        comp = stats.paired_difference({s: by_seed[method][s]["test"][metric] for s in seeds},
                                       {s: by_seed[base][s]["test"][metric] for s in seeds}, confidence, "t",
                                       higher_better=stats.higher_is_better(metric))
        out["gains"][method] = {"seeds": seeds, "per_seed": comp["differences"], **comp}
    return out


# ------------------------------------------------------------------------------------ text

def count_text(n: float | None) -> str:
    """``6.89T``, ``461k``: a count with an SI prefix and 3 significant digits (– for None)."""
    if n is None:
        return "–"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """The results table (and the comparison) as markdown: the columns of the run's kind of task."""
    return kind_of(results["settings"].get("task")).markdown(results)


def headline(results: dict[str, Any]) -> str:
    """One line: zero-shot against each method's test score (accuracy, perplexity or recall)."""
    return kind_of(results["settings"].get("task")).headline(results)


def format_plan(plan: dict[str, Any], settings: dict[str, Any], formula: str) -> str:
    """The dry-run text: data, steps, and per method each link's steps, rank, parameters, FLOPs."""
    m = plan["model"]
    sizes = plan["splits"][str(settings["seeds"][0])]
    lines = [
        f"model {m['name']}: {m['class']} ({m['model_type']}), {m['parameters']:,} parameters, "
        f"{m['body_parameters']:,} outside the embeddings; LoRA on {m['lora_layers']} layers "
        f"({', '.join(m['lora_targets']) or 'none'})",
        kind_of(settings.get("task")).task_line(plan, sizes),
        f"{plan['total_steps']} optimizer steps of {plan['examples_per_step']} examples "
        f"({plan['epochs']:.2f} epochs); seeds {', '.join(map(str, settings['seeds']))}",
    ]
    for method, p in plan["methods"].items():
        lines.append("")
        if method == "full":
            lines.append(f"method full: every weight trained, AdamW lr {p['lr']:g}, no chain")
        else:
            c = p["chain"]
            knots = p["knots"] if p["knots"] is not None else "decided during training"
            lines.append(f"method {method}: {p['links']} link(s), knots {knots}; merge policy {c['merge_policy']}, "
                         f"rank schedule {c['rank_schedule']}, re-init {c['reinit']}, merge rule {c['merge_rule']}, "
                         f"optimizer policy {c['optimizer_policy']}, lr policy {c['lr_policy']} over a "
                         f"{c['lr_schedule']} schedule, AdamW lr {p['lr']:g}")
        lines.append(f"  {'link':>4}  {'steps':>11}  {'rank':>4}  {'trainable params':>16}  {'train FLOPs':>11}")
        bounds = [0]
        for s in p["steps_per_link"] or []:
            bounds.append(bounds[-1] + s)
        for i in range(p["links"]):
            steps = f"{bounds[i] + 1}-{bounds[i + 1]}" if p["steps_per_link"] else "?"
            rank = str(p["ranks"][i]) if p["ranks"] else "–"
            params = p["trainable_params"][i] if i < len(p["trainable_params"]) else None
            flops = p["train_flops"][i] if p["train_flops"] else None
            lines.append(f"  {i + 1:>4}  {steps:>11}  {rank:>4}  {params:>16,}  {count_text(flops):>11}")
        total = sum(p["train_flops"]) if p["train_flops"] else None
        lines.append(f"  total training {count_text(total)}FLOP, evaluation {count_text(p.get('eval_flops'))}FLOP")
    lines += ["", f"FLOPs are estimates: {formula}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ files

def write_all(results: dict[str, Any], out: str | Path, plots: bool = True) -> dict[str, str]:
    """Write results.json, results.csv, results.md and the plots into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    results.setdefault("files", {})
    if plots:
        try:
            results["files"].update({k: str(v) for k, v in write_plots(results, out).items()})
        except ImportError as exc:
            log.warning("plots not written: %s", exc)
    results["files"].update({k: str(v) for k, v in paths.items()})
    atomic_write(paths["markdown"], markdown(results))
    write_csv(results, paths["csv"])
    write_json(paths["json"], results)
    return results["files"]


def versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the libraries a result depends on."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform(),
                                  "torch_threads": str(torch.get_num_threads())}
    for dist in ("chain-of-lora", "torch", "transformers", "peft", "numpy", "tokenizers", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


CSV_COLUMNS = ["method", "seed", "status", "links", "knots", "ranks", "trainable_params", "total_steps", "lr",
               "zero_shot_test_accuracy", "test_accuracy", "test_macro_f1", "test_acc_mean", "test_acc_sum",
               "test_acc_norm", "test_loss", "zero_shot_test_perplexity", "test_perplexity", "test_bits_per_byte",
               "test_reference_perplexity", "test_forgetting", "zero_shot_test_recall", "test_recall",
               "test_token_accuracy", "test_answer_loss", "test_paraphrase_recall", "test_reference_kl",
               "validation_curve", "final_train_loss",
               "train_seconds", "eval_seconds", "train_flops"]


def write_csv(results: dict[str, Any], path: Path) -> None:
    """One row per run."""
    metric = primary_metric(results["settings"])
    rows = []
    for r in results.get("runs", []):
        test = r.get("test", {})
        flops = (r.get("flops") or {}).get("train")
        rows.append({
            "method": r["method"], "seed": r["seed"], "status": r["status"],
            "links": len(r.get("knots") or []) + 1, "knots": " ".join(map(str, r.get("knots") or [])),
            "ranks": " ".join(map(str, r.get("ranks") or [])), "trainable_params": r["trainable_params"],
            "total_steps": r["total_steps"], "lr": r["lr"],
            "zero_shot_test_accuracy": results["zero_shot"]["test"].get("accuracy"),
            "zero_shot_test_perplexity": results["zero_shot"]["test"].get("perplexity"),
            "zero_shot_test_recall": results["zero_shot"]["test"].get("recall"),
            **{f"test_{k}": test.get(k) for k in ("perplexity", "bits_per_byte", "reference_perplexity", "forgetting",
                                                  "recall", "token_accuracy", "answer_loss", "paraphrase_recall",
                                                  "reference_kl")},
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "test_acc_mean": test.get("acc_mean"), "test_acc_sum": test.get("acc_sum"),
            "test_acc_norm": test.get("acc_norm"), "test_loss": test.get("loss"),
            "validation_curve": " ".join(f"{c['validation'][metric]:.4f}" for c in r.get("curve", [])),
            "final_train_loss": mean_loss(r["train_loss"][-10:]) if r.get("train_loss") else None,
            "train_seconds": round(r["seconds"]["train"], 2), "eval_seconds": round(r["seconds"]["eval"], 2),
            "train_flops": sum(flops) if flops else None,
        })
    write_rows(path, CSV_COLUMNS, rows)


def write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file with a header of ``columns``, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
