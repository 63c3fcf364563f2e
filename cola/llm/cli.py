"""``cola train``: fine-tune a causal LM with COLA, LoRA or full fine-tuning, and evaluate it.

    cola train                                      # embedded model and task, offline, CPU, minutes
    cola train --model facebook/opt-1.3b --task rte --method cola --links 3 --rank 8 --seeds 0 1 2 3 4
    cola train --model meta-llama/Llama-2-7b-hf --task boolq --config my-chain.toml
    cola train --compare lora,cola --task sst2      # same data, seeds and budget; prints the gain
    cola train --dry-run                            # the plan: knots, ranks, parameters, FLOPs
    torchrun --nproc_per_node 8 -m cola train --model meta-llama/Llama-2-7b-hf --task rte --batch-size 32 [--fsdp]
                                                    # data-parallel on 8 GPUs; --batch-size is the global one

Every flag is a field of :class:`cola.llm.settings.TrainSettings`; a config file (``--config``,
TOML or YAML) holds the same keys and a ``[chain]`` table of :class:`cola.ChainConfig` fields.
Flags win over the file. The loop itself is :func:`cola.llm.experiment.run_experiment`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from cola.config import STRATEGY_KINDS, ChainConfig
import cola.distributed as cd
from cola.errors import ColaError, ConfigError
from cola.fieldtypes import base_type, field_types
from cola.io import OutputError
from cola.llm import lock, report, stopping
from cola.llm.config_files import checked, merge, read_config_file
from cola.llm.experiment import output_dir, run_experiment
from cola.llm.parallel import on_main, start_distributed
from cola.llm.settings import FIELD_NAMES, FILE_KEYS, TrainSettings, default_of

log = logging.getLogger(__name__)

#: fields with their own handling below
_SPECIAL = {"chain", "resume", "config"}
_COMMA_LISTS = {"answers", "compare"}
_CHAIN_FIELDS = {f.name: f for f in fields(ChainConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
    value = default_of(name)
    if value is None:
        return "auto" if name in ("n_train", "n_val", "n_test", "max_length", "steps", "dtype", "device") else "none"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _option(text: str) -> tuple[str, Any]:
    """``key=value``, the value parsed as JSON when it is valid JSON (numbers, true, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. later_rank=4")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cola train``, from the fields of :class:`TrainSettings`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("config file keys are the flag names (with - or _) plus a [chain] table of cola.ChainConfig "
                     "fields; flags win over the file. FLOPs in the plan are estimates (see --dry-run).")
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (flags win over it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = field_types(TrainSettings)
    for f in fields(TrainSettings):
        if f.name in _SPECIAL:
            continue
        group_name = f.metadata.get("group", "other")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        tp = base_type(types[f.name])  # the annotation without its None: what one flag value is
        help_text = f.metadata["help"]
        if "default" not in help_text:
            help_text += f" (default: {_default_text(f.name)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in _COMMA_LISTS:
            kwargs.update(type=_comma_list, metavar="A,B")
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
        else:
            kwargs["type"] = tp
        if "choices" in f.metadata:  # checked with the other settings, so all problems come at once
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(_flag(f.name), **kwargs)
        if f.name == "method":
            group.add_argument("--resume", nargs="?", const=True, default=argparse.SUPPRESS, metavar="DIR",
                               help="continue the run in DIR (default: --output-dir, else the newest folder in "
                                    "runs/) from its checkpoints, with its saved settings")
    chain = parser.add_argument_group("chain strategies (cola.ChainConfig; see `cola plugins` for every name)")
    for kind in STRATEGY_KINDS:
        words = kind.replace("_", "-")
        chain.add_argument(f"--{words}", metavar="NAME", default=argparse.SUPPRESS, dest=f"chain.{kind}",
                           help=f"{kind.replace('_', ' ')} strategy by name (default: "
                                f"{_CHAIN_FIELDS[kind].default})")
        chain.add_argument(f"--{words}-option", metavar="KEY=VALUE", action="append", type=_option,
                           default=argparse.SUPPRESS, dest=f"chain.{kind}_options",
                           help=f"an option of the {kind.replace('_', ' ')} (repeatable; VALUE parsed as JSON "
                                "when possible)")
    chain.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default=argparse.SUPPRESS,
                       dest="chain.lr_schedule", help="base LR schedule over the steps (default: linear)")
    chain.add_argument("--warmup-steps", type=int, metavar="N", default=argparse.SUPPRESS, dest="chain.warmup_steps",
                       help="linear warm-up steps of the base schedule (default: 0)")
    chain.add_argument("--knots", type=int, nargs="+", metavar="STEP", default=argparse.SUPPRESS, dest="chain.knots",
                       help="explicit knot steps (merge policy 'knots' unless another is given)")
    chain.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       dest="chain.diagnostics", help="record gradient norm and effective rank at each knot")


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (only those), with the chain flags as a ``chain`` table."""
    given = vars(args)
    flags = {k: v for k, v in given.items() if k in FIELD_NAMES and k not in _SPECIAL}
    chain: dict[str, Any] = {}
    for key, value in given.items():
        if key.startswith("chain."):
            name = key.removeprefix("chain.")
            chain[name] = dict(value) if name.endswith("_options") else value
    if chain:
        flags["chain"] = chain
    if isinstance(flags.get("template"), str):  # a template typed in a shell: \n and \t are escapes
        flags["template"] = flags["template"].replace("\\n", "\n").replace("\\t", "\t")
    return flags


def newest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently modified folder under ``root`` that holds a run (``settings.json``)."""
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / "settings.json").is_file()]
    return max(runs, key=lambda p: (p / "settings.json").stat().st_mtime) if runs else None


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Defaults, then the saved settings (``--resume``), then the config file, then the flags."""
    flags = flags_of(args)
    config = getattr(args, "config", None)
    layers: list[dict[str, Any]] = []
    resume = getattr(args, "resume", None)
    if resume:
        folder = Path(resume) if isinstance(resume, str) else (
            Path(flags["output_dir"]) if flags.get("output_dir") else newest_run())
        if folder is None or not (folder / "settings.json").is_file():
            raise ConfigError(f"--resume: no run to resume in {str(folder) if folder else 'runs/'} "
                              "(a run folder holds settings.json)")
        saved = json.loads((folder / "settings.json").read_text())
        for key in ("stop_after", "dry_run", "resume", "config", "take_over_lock"):  # this invocation's, not the saved run's
            saved.pop(key, None)
        layers.append(checked(saved, str(folder / "settings.json"), FIELD_NAMES))
        flags.update(resume=True, output_dir=str(folder))
    if config:
        layers.append(checked(read_config_file(config), str(config), FILE_KEYS))
    layers.append(checked(flags, "command line", FIELD_NAMES))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    if config:
        merged["config"] = str(config)
    return TrainSettings(**merged)


def stopped(stop: BaseException, resume: str, main: bool) -> int:
    """What a command stopped by a signal prints (rank 0, on stderr) and returns: 128 + the signal's number.
    A first SIGTERM / SIGINT stopped after a step with a checkpoint (:class:`~cola.llm.stopping.SignalStop`),
    a second one (or a KeyboardInterrupt from elsewhere) at once."""
    signum = getattr(stop, "signum", signal.SIGINT)
    if main:
        what = stop if isinstance(stop, stopping.SignalStop) else (
            f"interrupted ({stop or signal.Signals(signum).name}): the last checkpoint is where it continues from")
        print(f"\n{what}\ncontinue with: {resume}", file=sys.stderr)
    return 128 + signum


def run(args: argparse.Namespace) -> int:
    """Run ``cola train``; print the plan (``--dry-run``) or the results table.

    Under ``torchrun`` / ``accelerate launch`` every rank runs this; rank 0 alone prints, shows
    progress bars and logs at INFO (the other ranks log warnings and errors only), and the process
    group is shut down at the end.
    """
    main = cd.is_main_process()
    try:
        return _run(args, main)
    except ColaError:
        if main:
            raise       # printed once, by rank 0 (the other ranks raised the same error)
        return 2
    finally:
        cd.shutdown()


def _run(args: argparse.Namespace, main: bool) -> int:
    if not main:  # rank 0 alone reports progress
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars
        except ImportError:
            pass
    settings = settings_from_args(args)
    if settings.dry_run:
        results = run_experiment(settings)
        if main:
            print(report.format_plan(results["plan"], results["settings"], results["flops_formula"]), end="")
        return 0
    if settings.output_dir is None:
        start_distributed(settings)  # so that every rank takes rank 0's (time-stamped) folder name
        settings = settings.replace(output_dir=str(on_main(lambda: output_dir(settings))))
    progress = main and not getattr(args, "quiet", False)
    try:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                results = run_experiment(settings, progress=True)
        else:
            results = run_experiment(settings)
    except (stopping.SignalStop, KeyboardInterrupt) as stop:
        return stopped(stop, f"cola train --resume {settings.output_dir}", main)
    except OutputError as err:  # a full, read-only or vanished disk: what to run once it is fixed
        # a lock file its release could not remove (a read-only disk) is taken over by the next command
        flag = f" {lock.TAKE_OVER_FLAG}" if lock.left_behind(settings.output_dir) else ""
        again = (f"continue with: cola train --resume {settings.output_dir}{flag}"
                 if (Path(settings.output_dir) / "settings.json").is_file() else
                 f"run the command again{' with' + flag if flag else ''}")
        raise OutputError(f"{err}, then {again}", err.errno, err.path) from None
    if not main:
        return 0
    print()
    print(report.markdown(results), end="")
    if results.get("summary"):
        print(report.headline(results))
    print(f"results: {results['files'].get('json')} (also .csv, .md"
          f"{', plots' if any(k.endswith('plot') for k in results['files']) else ''}); "
          f"{results['seconds']:.0f} s in all")
    if results["status"] != "complete":
        print(f"stopped early as asked (--stop-after); continue with: cola train --resume {results['output_dir']}")
    return 0
