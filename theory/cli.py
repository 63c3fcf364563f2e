"""``cola theory``: run the convergence checks, print a table, write JSON and PNG plots.

Called by ``cola/cli.py`` through :func:`add_arguments` and :func:`run`; also runnable alone
as ``python -m cola_theory.cli``. Exit status: 0 when every row passes, 1 when any fails
(a failed row is a finding, reported with its ratio), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

from .checks import CHECKS, CheckResult, Context, run_checks, to_jsonable
from .plots import write_plots
from .threads import single_threaded

__all__ = ["add_arguments", "run", "main", "format_table"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="larger problems, longer runs, more seeds and a wider T sweep (minutes)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/theory"),
                        help="where theory.json and the PNG plots go (default: runs/theory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and the runs (default 0)")
    parser.add_argument("--only", action="append", metavar="NAME", default=None,
                        help=f"run only this check group (repeatable, or comma-separated); one of: {', '.join(CHECKS)}")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the check groups and exit")


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def format_table(rows: list[CheckResult]) -> str:
    """The rows as a fixed-width table: check, kind, observed, relation, bound, ratio, result."""
    header = ("check", "kind", "observed", "rel", "bound", "ratio", "result")
    body = [(r.name, r.kind, _fmt(r.observed), r.relation, _fmt(r.bound), _fmt(r.ratio),
             "pass" if r.passed else "FAIL") for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 1, 3, 6) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_and_single_threaded(verbose: int) -> Iterator[None]:
    """One thread (see :mod:`cola_theory.threads`). Unless -v: no per-knot INFO lines, and no
    warnings for the steps the chain skips when a run diverges on purpose (the counterexample
    reports those in its row)."""
    loggers = [logging.getLogger(name) for name in ("cola", "cola_theory")]
    levels = [lg.level for lg in loggers]
    if verbose <= 0:
        loggers[0].setLevel(logging.ERROR)
        loggers[1].setLevel(logging.WARNING)
    try:
        with single_threaded():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list", False):
        for name, fn in CHECKS.items():
            print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = [n.strip() for item in (args.only or []) for n in item.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"cola theory: unknown check group(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}",
              file=sys.stderr)
        return 2
    from tqdm import tqdm

    start = time.perf_counter()
    rows: list[CheckResult] = []
    with _quiet_and_single_threaded(getattr(args, "verbose", 0)):
        ctx = Context(seed=args.seed, full=args.full)
        with tqdm(names, desc="cola theory", unit="group", file=sys.stderr, leave=False) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                rows += run_checks([name], ctx)[0]
        wall = time.perf_counter() - start
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = [] if args.no_plots else _plots(ctx, out_dir)
    failed = [r for r in rows if not r.passed]
    report = {
        "seed": args.seed,
        "full": bool(args.full),
        "groups": names,
        "wall_seconds": wall,
        "passed": not failed,
        "problems": {key: p.constants() for key, p in ctx.problems.items()},
        "checks": [r.to_dict() for r in rows],
        "curves": ctx.curves,
        "plots": [str(p) for p in plots],
    }
    json_path = out_dir / "theory.json"
    json_path.write_text(json.dumps(to_jsonable(report), indent=1))
    print(format_table(rows))
    print()
    summary = f"{len(rows)} checks: {len(rows) - len(failed)} passed"
    if failed:
        summary += f", {len(failed)} FAILED ({', '.join(r.name for r in failed)})"
    print(f"{summary}; {wall:.1f} s (seed {args.seed}{', full' if args.full else ''})")
    print(f"wrote {json_path}" + "".join(f", {p}" for p in plots))
    return 1 if failed else 0


def _plots(ctx: Context, out_dir: Path) -> list[Path]:
    return write_plots(ctx.curves, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cola theory", description="numerical checks of the convergence bounds")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
