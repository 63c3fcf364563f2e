"""The zero-shot scores of the base model inside ``cola train``: computed once per output folder (each kind's
evaluator, :meth:`cola.llm.tasks.kind.TaskKind.evaluator`, scores them), sharded under FSDP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import cola.distributed as cd
from cola.io import write_json
from cola.llm.parallel import on_main


def zero_shot(evaluator: Callable, host, out: Path, splits: dict) -> dict[str, Any]:
    """Zero-shot scores of the base model: test once (the same for every seed), validation per seed.

    Cached in ``out/zero_shot.json`` (rank 0 reads and writes it). Under FSDP the base model is
    scored sharded (:meth:`ModelHost.sharded_base`), then reloaded.
    """
    settings = evaluator.settings
    path = out / "zero_shot.json"
    cached = on_main(lambda: json.loads(path.read_text()) if path.is_file() else {"test": None, "validation": {}})
    seeds = list(splits)
    scored = settings.eval_links or bool(settings.eval_every)   # the validation split's zero-shot point is needed
    missing = cached["test"] is None or (scored
                                         and any(str(seed) not in cached["validation"] for seed in seeds))
    if missing:
        model, tokenizer = host.sharded_base(settings) if host.fsdp else host.get()
        write = cd.is_main_process()
        if cached["test"] is None:
            cached["test"] = evaluator(model, tokenizer, splits[seeds[0]].test, "zero-shot test")
            if write:
                write_json(path, cached)
        for seed in seeds if scored else []:
            if str(seed) not in cached["validation"]:
                cached["validation"][str(seed)] = evaluator(model, tokenizer, splits[seed].validation,
                                                            f"zero-shot validation (seed {seed})")
                if write:
                    write_json(path, cached)
        if host.fsdp:
            host.restore()
    return {"test": cached["test"], "validation": {int(s): v for s, v in cached["validation"].items()}}
