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

from cola.io import atomic_write, markdown_table, write_json
from cola.llm import stats
from cola.llm.records import complete_runs, mean_loss, primary_metric
from cola.llm.report_plots import write_plots

log = logging.getLogger(__name__)

TEST_METRICS = ("accuracy", "macro_f1", "acc_mean", "acc_sum", "acc_norm", "loss", "perplexity", "bits_per_byte",
                "reference_loss", "reference_perplexity", "forgetting", "recall", "token_accuracy", "answer_loss",
                "paraphrase_recall", "paraphrase_token_accuracy", "paraphrase_answer_loss", "reference_kl")
#: what a facts run's link did to the facts recalled before it (see cola.llm.facts.retention)
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

def _pm(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    text = f"{stats['mean']:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text


def count_text(n: float | None) -> str:
    """``6.89T``, ``461k``: a count with an SI prefix and 3 significant digits (– for None)."""
    if n is None:
        return "–"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """The results table (and the comparison) as markdown."""
    if results["settings"].get("task") == "corpus":
        return corpus_markdown(results)
    if results["settings"].get("task") == "facts":
        return facts_markdown(results)
    settings, plan = results["settings"], results["plan"]
    zero = results["zero_shot"]["test"]
    rule = settings["eval_rule"]
    has_f1 = "macro_f1" in zero
    lines = [f"### {plan['task']} on {settings['model']}: test accuracy (rule {rule}, n={zero['n']}), "
             f"{plan['total_steps']} steps of {plan['examples_per_step']} examples, "
             f"seeds {', '.join(map(str, settings['seeds']))}", ""]
    header = ["method", "links", "ranks", "trainable", "validation acc after each link", f"test acc ({rule})"]
    if has_f1:
        header.append("macro-F1")
    header += ["acc_mean", "acc_sum", "acc_norm", "train s/run"]
    table = []
    row = ["zero-shot", "–", "–", "0", "–", f"{zero['accuracy']:.3f}"]
    if has_f1:
        row.append(f"{zero['macro_f1']:.3f}")
    row += [f"{zero['acc_mean']:.3f}", f"{zero['acc_sum']:.3f}", f"{zero['acc_norm']:.3f}", "–"]
    table.append(row)
    for method, entry in results.get("summary", {}).items():
        p = plan["methods"][method]
        ranks = "/".join(map(str, p["ranks"])) if p["ranks"] else "all"
        curve = " → ".join(f"{c['mean']:.3f}" for c in entry["validation_curve"]) or "–"
        row = [method, str(p["links"]), ranks, f"{entry['trainable_params']:,}", curve,
               _pm(entry.get("test_accuracy"))]
        if has_f1:
            row.append(_pm(entry.get("test_macro_f1")))
        row += [_pm(entry.get("test_acc_mean")), _pm(entry.get("test_acc_sum")), _pm(entry.get("test_acc_norm")),
                f"{entry['train_seconds']['mean']:.0f}"]
        table.append(row)
    lines += [markdown_table(header, table), ""]
    return _finish_markdown(results, lines)


def _finish_markdown(results: dict[str, Any], lines: list[str]) -> str:
    lines += comparison_lines(results)
    if results.get("status") == "stopped":
        lines.append(f"**Stopped early** ({results.get('stopped')}): continue with `cola train --resume "
                     f"{results['output_dir']}`.")
    return "\n".join(lines).rstrip() + "\n"


def corpus_markdown(results: dict[str, Any]) -> str:
    """The corpus task's table: held-out perplexity after each link, test perplexity, bits per byte,
    the reference text's perplexity and the forgetting (its loss's rise over zero-shot)."""
    settings, plan = results["settings"], results["plan"]
    zero = results["zero_shot"]["test"]
    lines = [f"### corpus on {settings['model']}: held-out perplexity ({zero['n']} test blocks of "
             f"{plan['max_length']} tokens), {plan['total_steps']} steps of {plan['examples_per_step']} blocks, "
             f"seeds {', '.join(map(str, settings['seeds']))}", ""]
    header = ["method", "links", "ranks", "trainable", "validation ppl after each link", "test ppl", "bits/byte",
              "reference ppl", "forgetting (nats)", "KL to the start", "train s/run"]
    table = [["zero-shot", "–", "–", "0", "–", f"{zero['perplexity']:.3f}", f"{zero['bits_per_byte']:.4f}",
              f"{zero['reference_perplexity']:.3f}", "0", "0", "–"]]
    for method, entry in results.get("summary", {}).items():
        p = plan["methods"][method]
        curve = " → ".join(f"{c['mean']:.2f}" for c in entry["validation_curve"]) or "–"
        table.append([method, str(p["links"]), "/".join(map(str, p["ranks"])) if p["ranks"] else "all",
                      f"{entry['trainable_params']:,}", curve, _pm(entry.get("test_perplexity")),
                      _pm(entry.get("test_bits_per_byte"), 4), _pm(entry.get("test_reference_perplexity")),
                      _pm(entry.get("test_forgetting"), 4), _pm(entry.get("test_reference_kl"), 4),
                      f"{entry['train_seconds']['mean']:.0f}"])
    lines += [markdown_table(header, table), "",
              "Forgetting: the rise of the loss on the reference text (never trained on) over zero-shot, in nats "
              "per token; KL to the start: the mean KL divergence from the starting model's next-token "
              "distributions to the tuned one's on the same text (0 for the starting model; replay cannot hide it); "
              "lower perplexity, forgetting and KL are better.", ""]
    return _finish_markdown(results, _forgetting_lines(results, lines))


def _forgetting_lines(results: dict[str, Any], lines: list[str]) -> list[str]:
    """The replay, the other references' forgetting and each method's trajectory, after the table."""
    settings = results["settings"]
    if settings.get("replay_file"):
        lines += [f"Replay: {settings['replay_file']} ({settings['replay_loss']} loss, weight "
                  f"{settings['replay_weight']:g}), {settings['replay_ratio']:g} blocks per training example.", ""]
    rows = []
    for method in results.get("summary", {}):
        found: dict[str, list[float]] = {}
        for r in complete_runs(results, method):
            for source, m in (r["test"].get("more_references") or {}).items():
                if m.get("forgetting") is not None:
                    found.setdefault(source, []).append(m["forgetting"])
        rows += [[method, source, _pm(stats.describe(v), 4)] for source, v in found.items()]
    if rows:
        lines += ["Forgetting on the other references (loss rise over zero-shot, nats per token):", "",
                  markdown_table(["method", "reference", "forgetting"], rows), ""]
    traj = [[m, str(p["step"]), _pm(p.get(primary_metric(settings))), _pm(p.get("forgetting"), 4),
             _pm(p.get("reference_kl"), 4)] for m, e in results.get("summary", {}).items()
            for p in e.get("trajectory") or []]
    if traj:
        lines += [f"Trajectory (validation every {settings['eval_every']} steps):", "",
                  markdown_table(["method", "step", primary_metric(settings), "forgetting", "KL to the start"], traj),
                  ""]
    return lines


def facts_markdown(results: dict[str, Any]) -> str:
    """The facts task's table: recall after each link, test recall, token accuracy, answer loss, recall on
    the paraphrases and the forgetting; then, per method, what each link did to the facts recalled before."""
    settings, plan = results["settings"], results["plan"]
    zero = results["zero_shot"]["test"]
    lines = [f"### facts on {settings['model']}: exact-match recall of {zero['n']} facts taught "
             f"({plan['facts']['facts']['source']}), {plan['total_steps']} steps of {plan['examples_per_step']} facts "
             f"({plan['epochs']:.1f} epochs), seeds {', '.join(map(str, settings['seeds']))}", ""]
    header = ["method", "links", "ranks", "trainable", "recall after each link", "test recall", "token acc",
              "answer loss", "paraphrase recall", "forgetting (nats)", "KL to the start", "train s/run"]
    table = [["zero-shot", "–", "–", "0", "–", f"{zero['recall']:.3f}", f"{zero['token_accuracy']:.3f}",
              f"{zero['answer_loss']:.3f}", f"{zero['paraphrase_recall']:.3f}" if "paraphrase_recall" in zero else "–",
              "0", "0", "–"]]
    retained = []
    for method, entry in results.get("summary", {}).items():
        p = plan["methods"][method]
        curve = " → ".join(f"{c['mean']:.3f}" for c in entry["validation_curve"]) or "–"
        table.append([method, str(p["links"]), "/".join(map(str, p["ranks"])) if p["ranks"] else "all",
                      f"{entry['trainable_params']:,}", curve, _pm(entry.get("test_recall")),
                      _pm(entry.get("test_token_accuracy")), _pm(entry.get("test_answer_loss")),
                      _pm(entry.get("test_paraphrase_recall")), _pm(entry.get("test_forgetting"), 4),
                      _pm(entry.get("test_reference_kl"), 4), f"{entry['train_seconds']['mean']:.0f}"])
        for link in entry.get("retention", [])[1:]:
            retained.append([method, str(link["after_link"]), _pm(link["kept"], 1), _pm(link["lost"], 1),
                             _pm(link["new"], 1), _pm(link["kept_fraction"])])
    lines += [markdown_table(header, table), "",
              "Recall: the fraction of facts whose whole answer greedy decoding gives (every answer token the "
              "argmax); paraphrase recall: on the phrasings never trained on; forgetting: the rise of the reference "
              "text's loss over zero-shot, in nats per token; KL to the start: the mean KL divergence from the "
              "starting model's next-token distributions to the tuned one's on the same text.", ""]
    lines = _forgetting_lines(results, lines)
    if retained:
        lines += ["Link by link (validation facts, mean ± std over seeds): kept = recalled before the link and "
                  "after it, lost = recalled before only, new = recalled after only.", "",
                  markdown_table(["method", "after link", "kept", "lost", "new", "kept / recalled before"], retained),
                  ""]
    return _finish_markdown(results, lines)


def comparison_lines(results: dict[str, Any]) -> list[str]:
    comparison = results.get("comparison")
    if not comparison:
        return []
    lines = []
    base, metric = comparison["baseline"], comparison["metric"]
    what = f"test {metric}" + (f", rule {comparison['rule']}" if metric == "accuracy" else
                               ", lower is better" if not comparison["higher_is_better"] else "")
    for method, g in comparison["gains"].items():
        per_seed = ", ".join(f"{d:+.3f}" for d in g["per_seed"])
        interval = (f" [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] ({int(round(100 * g['confidence']))}% t interval, "
                    f"paired by seed)" if g["ci_low"] is not None else
                    " (one seed: no interval; pass --seeds 0 1 2 for one)")
        lines.append(f"Gain of {method} over {base} ({what}; {method} - {base}): {g['mean']:+.3f}{interval}; "
                     f"per seed {per_seed}: **{g['verdict']}**.")
    lines.append("")
    return lines


def headline(results: dict[str, Any]) -> str:
    """One line: zero-shot vs fine-tuned test accuracy (or perplexity) of each method."""
    zero = results["zero_shot"]["test"]
    if results["settings"].get("task") == "corpus":
        parts = [f"zero-shot {zero['perplexity']:.3f}"] + [
            f"{m} {_pm(e.get('test_perplexity'))} (forgetting {_pm(e.get('test_forgetting'), 4)}, KL "
            f"{_pm(e.get('test_reference_kl'), 4)})"
            for m, e in results.get("summary", {}).items()]
        return f"corpus test perplexity (n={zero['n']} blocks): " + " | ".join(parts)
    if results["settings"].get("task") == "facts":
        parts = [f"zero-shot {zero['recall']:.3f}"] + [
            f"{m} {_pm(e.get('test_recall'))} (forgetting {_pm(e.get('test_forgetting'), 4)}, KL "
            f"{_pm(e.get('test_reference_kl'), 4)})"
            for m, e in results.get("summary", {}).items()]
        return f"facts recall (n={zero['n']} facts): " + " | ".join(parts)
    rule = results["settings"]["eval_rule"]
    parts = [f"zero-shot {zero['accuracy']:.3f}"]
    for method, entry in results.get("summary", {}).items():
        parts.append(f"{method} {_pm(entry.get('test_accuracy'))}")
    return f"{results['plan']['task']} test accuracy (rule {rule}, n={zero['n']}): " + " | ".join(parts)


def _task_line(plan: dict[str, Any], sizes: dict[str, int]) -> str:
    if "facts" in plan:
        facts = plan["facts"]["facts"]
        return (f"task facts: {sizes['train']} facts from {facts['source']} (fingerprint {facts['fingerprint']}), "
                f"every one trained on and tested, {sizes['validation']} scored after every link, "
                f"{sizes['paraphrases']} paraphrased prompts tested; {plan['tokens_per_example']:.1f} tokens per fact "
                f"on average; forgetting on {sizes['reference']} blocks of "
                f"{plan['facts']['reference']['description']}")
    if "corpus" not in plan:
        return (f"task {plan['task']} (answers {', '.join(plan['answers'])}): {sizes['train']} train / "
                f"{sizes['validation']} validation / {sizes['test']} test; {plan['tokens_per_example']:.1f} tokens "
                f"per training example on average (max_length {plan['max_length']})")
    text, ref = plan["corpus"]["corpus"], plan["corpus"]["reference"]
    split = next(iter(plan["corpus"]["splits"].values()))
    return (f"task corpus: {text['description']} ({text['n_documents']:,} documents, {text['n_bytes']:,} bytes), "
            f"split by document into {sizes['train']:,} train / {sizes['validation']} validation / "
            f"{sizes['test']} test blocks of {plan['max_length']} tokens (held out: "
            f"{split['validation']['n_documents']} and {split['test']['n_documents']} documents); forgetting on "
            f"{sizes['reference']} blocks of {ref['description']}")


def format_plan(plan: dict[str, Any], settings: dict[str, Any], formula: str) -> str:
    """The dry-run text: data, steps, and per method each link's steps, rank, parameters, FLOPs."""
    m = plan["model"]
    sizes = plan["splits"][str(settings["seeds"][0])]
    lines = [
        f"model {m['name']}: {m['class']} ({m['model_type']}), {m['parameters']:,} parameters, "
        f"{m['body_parameters']:,} outside the embeddings; LoRA on {m['lora_layers']} layers "
        f"({', '.join(m['lora_targets']) or 'none'})",
        _task_line(plan, sizes),
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
