"""The ``cola`` command: ``cola train``, ``cola sweep``, ``cola theory``, ``cola plugins``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing the module lazily so that
``cola plugins`` does not pay for transformers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from .errors import ColaError
from .io import output_error
from .manager import get_plugin_manager

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("cola.llm.cli", "fine-tune an OPT / Llama model with COLA, LoRA or full fine-tuning"),
    "sweep": ("cola.llm.sweep.cli", "a grid of cola train runs with paired comparisons to a baseline"),
    "theory": ("cola_theory.cli", "numerical checks of the convergence bounds on synthetic problems"),
    "plugins": ("cola.cli", "list every plugin, its version and what it registers"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def run(args: argparse.Namespace) -> int:
    """``cola plugins``: one block per plugin, with distribution, version, hooks and strategies."""
    infos = get_plugin_manager().plugin_infos()
    if args.json:
        print(json.dumps([vars(i) for i in infos], indent=2))
        return 0
    for info in infos:
        origin = f"{info.distribution or 'registered in code'} {info.version or ''}".strip()
        print(f"{info.name}  ({origin})")
        if info.error:
            print(f"  FAILED TO LOAD: {info.error}")
            continue
        for kind, names in sorted(info.strategies.items()):
            print(f"  {kind}: {', '.join(names)}")
        other = [h for h in info.hooks if not h.startswith("cola_register_")]
        if other:
            print(f"  hooks: {', '.join(other)}")
    return 0


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` subcommand's module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="cola", description="Chain of LoRA (COLA) fine-tuning")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        if name != selected:
            continue
        try:
            importlib.import_module(module).add_arguments(sub)
        except ImportError as err:  # e.g. the llm extra is not installed
            sub.set_defaults(_import_error=f"{err}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None):
        print(f"cola {args.command}: cannot start: {args._import_error}\n"
              f"install the extras: pip install 'chain-of-lora[llm]'", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(args._module).run(args)
    except ColaError as err:
        print(f"cola {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a write the library does not wrap, failing for the machine (a full disk, ...)
        fault = output_error(err, getattr(err, "filename", None) or ".")
        if fault is None:
            raise
        print(f"cola {args.command}: error: {fault}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
