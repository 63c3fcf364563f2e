"""The pieces of a ``cola train`` results table that every kind of task shares: ``mean ± std`` cells, the paired
comparison's lines, the replay, the other references' forgetting and the learn / forget trajectory."""

from __future__ import annotations

from typing import Any

from cola.io import markdown_table
from cola.llm import stats


def complete_runs(results: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The completed run records of ``method`` in a ``results`` dict."""
    return [r for r in results.get("runs", []) if r.get("method") == method and r.get("status") == "complete"]


def pm(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    text = f"{stats['mean']:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text


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


def finish_markdown(results: dict[str, Any], lines: list[str]) -> str:
    lines += comparison_lines(results)
    if results.get("status") == "stopped":
        lines.append(f"**Stopped early** ({results.get('stopped')}): continue with `cola train --resume "
                     f"{results['output_dir']}`.")
    return "\n".join(lines).rstrip() + "\n"


def forgetting_lines(results: dict[str, Any], lines: list[str], metric: str) -> list[str]:
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
        rows += [[method, source, pm(stats.describe(v), 4)] for source, v in found.items()]
    if rows:
        lines += ["Forgetting on the other references (loss rise over zero-shot, nats per token):", "",
                  markdown_table(["method", "reference", "forgetting"], rows), ""]
    traj = [[m, str(p["step"]), pm(p.get(metric)), pm(p.get("forgetting"), 4),
             pm(p.get("reference_kl"), 4)] for m, e in results.get("summary", {}).items()
            for p in e.get("trajectory") or []]
    if traj:
        lines += [f"Trajectory (validation every {settings['eval_every']} steps):", "",
                  markdown_table(["method", "step", metric, "forgetting", "KL to the start"], traj),
                  ""]
    return lines
