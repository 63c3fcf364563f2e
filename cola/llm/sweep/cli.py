"""``cola sweep``: a grid of ``cola train`` runs with paired comparisons to a baseline.

    cola sweep --recipe chain-length-cpu                       # a shipped recipe (see --list-recipes)
    cola sweep --recipe chain-length-cpu --lr 2e-3 1e-3 5e-4   # flags replace the recipe's axes/settings
    cola sweep --links 1 2 3 --lr 1e-3 5e-4 --seeds 0 1 2 --task tweets --steps 60
    cola sweep --axis chain.rank_schedule_options.later_rank=2,4,6,8 --rank-schedule step-down --links 2
    cola sweep --resume sweeps/chain-length-cpu-20261128-2200  # continue (or grow) a sweep
    cola sweep --recipe rank-step-down-cpu --dry-run           # cells, knots, ranks, FLOPs; no training
    cola sweep --links 1 3 --tune lr=1e-3,2e-3,5e-3 --tune-seeds 100  # each cell at its own best LR
    cola sweep --task facts --train-file synthetic:128 --links 1 2 --tune lr=auto:3e-4:1e-2 --max-forgetting 0.3

Grid flags take several values (each makes an axis); every other ``cola train`` flag sets the
base settings of all cells. The library function is :func:`cola.llm.sweep.run_sweep`.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cola.errors import ConfigError
from cola.io import OutputError
from cola.llm import cli as train_cli
from cola.llm import lock, stopping
from cola.llm.sweep import report as sweep_report
from cola.llm.cli import flags_of
from cola.llm.config_files import checked, merge, read_config_file
from cola.llm.settings import FIELD_NAMES, FILE_KEYS
from cola.llm.stats import CI_METHODS
from cola.llm.sweep import run_sweep
from cola.llm.sweep.spec import METRICS, SweepSpec, axis_path, load_recipe, recipe_names, set_path

#: grid flags: name -> (axis path, value type)
GRID_FLAGS = {
    "links": ("links", int), "rank": ("rank", int), "lr": ("lr", float), "epochs": ("epochs", float),
    "steps": ("steps", int), "method": ("method", str), "rank-schedule": ("chain.rank_schedule", str),
    "reinit": ("chain.reinit", str), "optimizer-policy": ("chain.optimizer_policy", str),
    "lr-policy": ("chain.lr_policy", str), "merge-policy": ("chain.merge_policy", str),
    "later-rank": ("chain.rank_schedule_options.later_rank", int),
}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _axis(text: str) -> tuple[str, list[Any]]:
    """``PATH=V1,V2`` (values parsed as JSON when possible) or ``PATH=[JSON list]``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AXIS=V1,V2,..., e.g. chain.reinit=lora,pissa")
    key, values = text.split("=", 1)
    values = values.strip()
    if values.startswith("["):
        parsed = _json_or_text(values)
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError(f"{text!r}: {values!r} is not a JSON list")
        return key.strip(), parsed
    return key.strip(), [_json_or_text(v.strip()) for v in values.split(",") if v.strip()]


def _cell(text: str) -> dict[str, Any]:
    """``KEY=VALUE,KEY=VALUE``: one extra cell's axis values (values parsed as JSON when possible)."""
    cell = dict(_override(part) for part in text.split(",") if part.strip())
    if not cell:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. method=lora,rank=8")
    return cell


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. method=lora or links=1")
    key, value = text.split("=", 1)
    return key.strip(), _json_or_text(value.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.conflict_handler = "resolve"  # the grid flags below replace cola train's single-valued ones
    train_cli.add_arguments(parser)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--recipe", metavar="NAME|FILE", help="a shipped recipe (--list-recipes) or a sweep file "
                       "(TOML/YAML: [settings], [grid], [baseline], seeds, metric, ci)")
    sweep.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and stop")
    sweep.add_argument("--baseline", metavar="KEY=VALUE", action="append", type=_override,
                       help="the baseline as overrides of each cell (repeatable; default method=lora: one LoRA "
                            "link with the cell's other settings)")
    sweep.add_argument("--metric", choices=METRICS, help="test metric compared (default: the task's own, "
                       "perplexity for --task corpus, recall for --task facts and accuracy under --eval-rule "
                       "otherwise)")
    sweep.add_argument("--ci", choices=CI_METHODS, help="interval of the mean paired difference: t (default) "
                       "or a paired bootstrap over seeds")
    sweep.add_argument("--confidence", type=float, help="confidence of the intervals (default 0.95)")
    sweep.add_argument("--resume", nargs="?", const=True, metavar="DIR", help="continue the sweep in DIR "
                       "(default: --output-dir); grid flags given too replace its axes (finished runs are reused)")
    sweep.add_argument("--reuse-runs", action="append", metavar="DIR", default=[], help="copy the finished runs "
                       "of another sweep folder DIR that this sweep would make (same run key and seed) instead of "
                       "running them again; repeatable")
    sweep.add_argument("--max-runs", type=int, metavar="N", help="run at most N (cell, seed) runs, then write "
                       "the results so far (continue with --resume)")
    sweep.add_argument("--tune", action="append", type=_axis, dest="tune_axes", default=argparse.SUPPRESS,
                       metavar="AXIS=V1,V2", help="pick each cell's (and baseline's) own value of AXIS before scoring "
                       "it, by the validation metric of --tune-seeds (repeatable: --tune lr=1e-3,2e-3,5e-3 --tune "
                       "full_lr=1e-5,1e-4); replaces a recipe's [tune] table")
    sweep.add_argument("--tune-seeds", nargs="+", type=int, metavar="S", default=argparse.SUPPRESS,
                       help="seeds of the tuning runs, disjoint from --seeds (default 1000)")
    sweep.add_argument("--max-forgetting", type=float, metavar="B", default=argparse.SUPPRESS,
                       help="a forgetting budget (nats of the reference loss's rise, validation, mean over the tuning "
                       "seeds): each cell picks its best candidate within it; a cell with none is reported so")
    sweep.add_argument("--max-kl", type=float, metavar="B", default=argparse.SUPPRESS,
                       help="a budget on the KL divergence to the starting model on the reference, like "
                       "--max-forgetting (both may be given)")
    sweep.add_argument("--tune-refine", type=int, metavar="N", dest="refine", default=argparse.SUPPRESS,
                       help="rounds of refinement of the numeric tuned axes (candidates log-midway between the best "
                       "and its neighbours, one step beyond an end; default 0, or 2 for --tune AXIS=auto:LOW:HIGH)")
    sweep.add_argument("--tune-step", action="store_true", default=argparse.SUPPRESS,
                       help="also pick the step of each candidate's trajectory (needs --eval-every): the cell's "
                       "report runs end at the chosen step, as a user picks a checkpoint")
    grid = parser.add_argument_group("grid axes (two or more values make an axis; one value sets every cell)")
    for flag, (path, kind) in GRID_FLAGS.items():
        grid.add_argument(f"--{flag}", nargs="+", type=kind, dest=f"grid:{path}", default=argparse.SUPPRESS,
                          metavar="V", help=f"values of {path}")
    grid.add_argument("--seeds", nargs="+", type=int, dest="sweep_seeds", default=argparse.SUPPRESS, metavar="S",
                      help="seeds of every cell (default 0 1 2); each fixes the data draw, init and order")
    grid.add_argument("--cell", action="append", type=_cell, dest="extra_cells", default=argparse.SUPPRESS,
                      metavar="K=V[,K=V]", help="a cell beyond the grid (repeatable), e.g. --cell method=full or "
                      "--cell method=lora,rank=8; compared with the baseline like the grid's cells")
    grid.add_argument("--axis", action="append", type=_axis, dest="axes", default=argparse.SUPPRESS,
                      metavar="AXIS=V1,V2", help="any other axis: a cola train setting, chain.<field> or "
                      "chain.<kind>_options.<option>; values as JSON when possible, or AXIS=[JSON list]")


def spec_from_args(args: argparse.Namespace):
    """The :class:`~cola.llm.sweep.SweepSpec`: recipe (or the resumed sweep), then config file, then flags."""
    given = vars(args)
    data: dict[str, Any] = {}
    resume = given.get("resume")
    if resume:
        folder = Path(resume) if isinstance(resume, str) else (Path(args.output_dir) if given.get("output_dir")
                                                               else None)
        if folder is None:
            raise ConfigError("--resume: name the sweep folder (--resume DIR or --output-dir DIR)")
        saved_path = folder / "sweep.json"
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {folder} holds no sweep (no sweep.json)")
        data = json.loads(saved_path.read_text())["spec"]
        args.output_dir = str(folder)
        if args.recipe:
            raise ConfigError(f"--resume continues the sweep saved in {folder}: drop --recipe {args.recipe}")
    elif args.recipe:
        data = load_recipe(args.recipe).to_dict()
    settings = dict(data.get("settings") or {})
    layers = [checked(settings, "sweep settings", FILE_KEYS)]
    if given.get("config"):
        layers.append(checked(read_config_file(given["config"]), str(given["config"]), FILE_KEYS))
    flags = flags_of(args)
    for key in ("output_dir", "dry_run", "take_over_lock"):  # the sweep's own
        flags.pop(key, None)
    if "stop_after" in flags:
        raise ConfigError("--stop-after: a sweep stops between runs: use --max-runs N, then --resume")
    layers.append(checked(flags, "command line", FIELD_NAMES))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    grid = {axis_path(k): v for k, v in (data.get("grid") or {}).items()}
    given_axes = [(k[5:], v) for k, v in given.items() if k.startswith("grid:")] + list(given.get("axes") or [])
    for key, values in given_axes:  # several values: an axis; one value: a base setting (replacing any axis)
        path = axis_path(key)
        if len(values) > 1:
            grid[path] = list(values)  # an axis the recipe has keeps its place (and the labels their order)
        elif values:
            grid.pop(path, None)
            set_path(merged, path, values[0])
    for path in grid:  # an axis replaces the same setting in the base settings
        head, _, rest = path.partition(".")
        if head == "chain" and "." not in rest:
            merged.get("chain", {}).pop(rest, None)
        elif head != "chain":
            merged.pop(head, None)
    spec = {**{k: v for k, v in data.items() if k not in ("settings", "grid")}, "settings": merged, "grid": grid}
    if given.get("sweep_seeds"):
        spec["seeds"] = list(args.sweep_seeds)
    if given.get("baseline"):
        spec["baseline"] = dict(args.baseline)
    if given.get("extra_cells"):
        spec["cells"] = [*(spec.get("cells") or []), *args.extra_cells]
    if given.get("tune_axes"):
        spec["tune"] = {key: values for key, values in args.tune_axes}
    if given.get("tune_seeds"):
        spec["tune_seeds"] = list(args.tune_seeds)
    for key in ("metric", "ci", "confidence", "max_forgetting", "max_kl", "refine", "tune_step"):
        if given.get(key) is not None:
            spec[key] = given[key]
    return SweepSpec.from_dict(spec, "sweep")


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        for name in recipe_names():
            spec = load_recipe(name)
            print(f"{name}: {(spec.description or '').strip().splitlines()[0] if spec.description else ''}")
        return 0
    spec = spec_from_args(args)
    out = Path(args.output_dir) if getattr(args, "output_dir", None) else Path("sweeps") / (
        f"{spec.name or 'sweep'}-{datetime.now():%Y%m%d-%H%M%S}")
    dry = bool(getattr(args, "dry_run", False))
    if dry:
        print(sweep_report.format_plan(run_sweep(spec, out, dry_run=True)), end="")
        return 0
    progress = not getattr(args, "quiet", False)
    take_over = bool(getattr(args, "take_over_lock", False))
    options = dict(resume=bool(args.resume), max_runs=args.max_runs, take_over_lock=take_over,
                   reuse_from=args.reuse_runs)
    try:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                results = run_sweep(spec, out, progress=True, **options)
        else:
            results = run_sweep(spec, out, **options)
    except (stopping.SignalStop, KeyboardInterrupt) as stop:
        return train_cli.stopped(stop, f"cola sweep --resume {out}", True)
    except OutputError as err:  # a full, read-only or vanished disk: what to run once it is fixed
        flag = f" {lock.TAKE_OVER_FLAG}" if lock.left_behind(out) else ""   # its release could not remove it
        again = (f"continue with: cola sweep --resume {out}{flag}" if (out / "sweep.json").is_file() else
                 f"run it again{' with' + flag if flag else ''}")
        raise OutputError(f"{err}, then {again}", err.errno, err.path) from None
    print()
    print(sweep_report.markdown(results), end="")
    print(f"results: {results['files']['json']} (also .csv, .md, plots) in {out}")
    if results["status"] != "complete":
        print(f"{results['runs_finished']} of {results['runs_expected']} runs finished; continue with: "
              f"cola sweep --resume {out}")
    return 0 if not results["failures"] else 1
