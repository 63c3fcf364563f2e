"""One ``cola sweep``'s runs: each (cell, seed) a ``cola train`` run in ``runs/<key>/seed<k>/``, the base model
loaded once and handed to every run, the zero-shot scores shared between runs of the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import cola
from cola.errors import ColaError, ConfigError
from cola.io import OutputError, write_json
from cola.llm import stopping
from cola.llm.experiment import run_experiment
from cola.llm.models import load_model
from cola.llm.settings import TrainSettings, default_of
from cola.llm.sweep.cells import KEY_VERSION, Cell, effective
from cola.llm.sweep.results import read_json, run_status
from cola.llm.sweep.spec import SweepSpec
from cola.llm.tracking import Naming

log = logging.getLogger(__name__)

#: settings the zero-shot scores depend on
_ZERO_SHOT_KEYS = ("model", "task", "data_dir", "train_file", "test_file", "template", "answers", "label_field",
                   "n_train", "n_val", "n_test", "test_seed", "max_length", "dtype", "eval_rule", "eval_batch_size",
                   "eval_links", "loss")

class ModelCache:
    """Hands every run the same base model object (runs restore it afterwards), reloaded only when
    a run changed it (full fine-tuning, a failure) or asks for another model, dtype or device."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model = None
        self.tokenizer = None

    def loader(self, settings: TrainSettings) -> Callable[[], tuple[Any, Any]]:
        key = (settings.model, settings.dtype, settings.device)

        def load():
            if self.key != key or self.model is None or not self._pristine():
                self.model = self.tokenizer = None
                self.model, self.tokenizer = load_model(settings.model, settings.dtype, settings.device)
                self.key = key
            return self.model, self.tokenizer

        return load

    def _pristine(self) -> bool:
        return not cola.lora_layers(self.model) and not any(p.requires_grad for p in self.model.parameters())

    def after(self, settings: TrainSettings, ok: bool) -> None:
        if settings.method == "full" or not ok:
            self.model = self.tokenizer = None


#: settings the zero-shot scores also depend on, in the key only when they differ from their default (so that the
#: keys of sweeps from before they existed stay the same)
_ZERO_SHOT_KEYS_IF_SET = ("reference_file", "more_references", "replay_file", "kl_top_k", "train_paraphrases",
                          "paraphrases_field", "prompt_field", "answer_field", "files", "text_field")


def zero_shot_key(settings: TrainSettings) -> str:
    s = settings.resolved().to_dict()
    data = {k: s[k] for k in _ZERO_SHOT_KEYS}
    data.update({k: s[k] for k in _ZERO_SHOT_KEYS_IF_SET if s[k] != default_of(k)})
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def share_zero_shot(out: Path, settings: TrainSettings, seed: int, run_dir: Path, direction: str) -> None:
    """Copy the shared zero-shot scores into a new run's folder (``in``) or collect a run's (``out``)."""
    shared_path = out / "zero_shot" / f"{zero_shot_key(settings)}.json"
    shared = read_json(shared_path) or {"test": None, "validation": {}}
    local_path = run_dir / "zero_shot.json"
    if direction == "in":
        if shared["test"] is None or local_path.is_file():
            return
        local = {"test": shared["test"], "validation": {}}
        if str(seed) in shared["validation"]:
            local["validation"][str(seed)] = shared["validation"][str(seed)]
        write_json(local_path, local)
        return
    local = read_json(local_path)
    if not local:
        return
    changed = shared["test"] is None and local.get("test") is not None
    if changed:
        shared["test"] = local["test"]
    for s, v in (local.get("validation") or {}).items():
        if s not in shared["validation"]:
            shared["validation"][s] = v
            changed = True
    if changed:
        write_json(shared_path, shared)


class Runner:
    """Runs (cell, seed) units not finished yet, at most ``max_runs`` in all the calls of one invocation.
    A failing run is logged and added to ``failures``; the others go on."""

    def __init__(self, out: Path, loader, progress: bool, max_runs: int | None, failures: list[dict[str, Any]],
                 reuse_from: tuple[Path, ...] = ()):
        self.out, self.loader, self.progress, self.max_runs, self.failures = out, loader, progress, max_runs, failures
        self.reuse_from = tuple(check_reuse_source(Path(src), out) for src in reuse_from)
        self.cache = ModelCache()
        self.done_now = 0

    def run(self, units: list[tuple[Cell, int]], what: str) -> str:
        """``complete`` when every unit is finished, else ``partial``."""
        status = "complete"
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(units), desc=what, unit="run", dynamic_ncols=True, position=0)
        try:
            for i, (cell, seed) in enumerate(units, 1):
                run_dir = self.out / "runs" / cell.key / f"seed{seed}"
                state = run_status(run_dir)
                if state == "new" and self.reuse(cell, seed, run_dir):
                    state = "complete"
                if state != "complete":
                    if self.max_runs is not None and self.done_now >= self.max_runs:
                        return "partial"
                    log.info("%s run %d/%d: %s, seed %d (%s)", what, i, len(units), cell.label, seed,
                             "resuming" if state == "partial" else "new")
                    status = status if self.one(cell, seed, run_dir, state) else "partial"
                    self.done_now += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return status

    def reuse(self, cell: Cell, seed: int, run_dir: Path) -> bool:
        """Copy the finished run of the same key and seed from another sweep folder (``--reuse-runs``): the key
        hashes every setting the run computes with, so it is the run this sweep would make. Checkpoints are left
        behind; ``reused.json`` in the copy names where it came from."""
        for src in self.reuse_from:
            found = src / "runs" / cell.key / f"seed{seed}"
            if run_status(found) != "complete":
                continue
            tmp = run_dir.with_name(f".{run_dir.name}.reuse-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(found, tmp, ignore=shutil.ignore_patterns("checkpoint.pt", "*.lock", "cola.lock"))
            write_json(tmp / "reused.json", {"from": str(found)})
            if run_dir.exists():   # a "new" run folder (started, nothing finished): replaced by the finished one
                shutil.rmtree(run_dir)
            os.replace(tmp, run_dir)
            share_zero_shot(self.out, effective(cell.settings).replace(seeds=[seed]), seed, run_dir, "out")
            log.info("reused %s, seed %d: the finished run %s", cell.label, seed, found)
            return True
        return False

    def naming(self, cell: Cell) -> Naming:
        """A run's tracked name ``<sweep folder>/<cell label>/<method>-seed<k>`` (tuning runs' labels start with
        ``tuning``), its TensorBoard events in ``tracking/<cell label>/<method>-seed<k>`` of the sweep folder."""
        return Naming(f"{self.out.name}/{cell.label}", self.out / "tracking" / cell.label.replace("/", "_"))

    def one(self, cell: Cell, seed: int, run_dir: Path, state: str) -> bool:
        # the sweep holds its folder's lock, so a lock inside one of its runs' folders was left by one of its own
        # runs that was killed (or by a `cola train` on that folder): taken over when stale; a live owner never
        settings = effective(cell.settings).replace(seeds=[seed], output_dir=str(run_dir), resume=state == "partial",
                                                    take_over_lock=True)
        share_zero_shot(self.out, settings, seed, run_dir, "in")
        ok = False
        try:
            results = run_experiment(settings, loader=self.loader or self.cache.loader(settings),
                                     progress=self.progress, naming=self.naming(cell))
            ok = results.get("status") == "complete"
        except (OutputError, stopping.SignalStop):
            raise   # the machine (a full or read-only disk) or a signal stops the sweep: no failure of this run
        except ColaError as err:
            log.error("sweep run %s seed %d failed: %s", cell.label, seed, err)
            self.failures.append({"label": cell.label, "key": cell.key, "seed": seed, "error": str(err)})
        finally:
            self.cache.after(settings, ok)
            share_zero_shot(self.out, settings, seed, run_dir, "out")
        return ok


def check_reuse_source(src: Path, out: Path) -> Path:
    """A sweep folder whose finished runs may be copied: it holds a sweep of the current run keys, not ``out``."""
    saved = read_json(src / "sweep.json")
    if saved is None:
        raise ConfigError(f"--reuse-runs {src}: not a sweep folder (no sweep.json); give the folder of a sweep "
                          "whose finished runs to reuse")
    if saved.get("keys", 1) != KEY_VERSION:
        raise ConfigError(f"--reuse-runs {src}: its run keys are of version {saved.get('keys', 1)}, this cola's of "
                          f"version {KEY_VERSION}; resume that sweep once with this cola (cola sweep --resume {src}) "
                          "to migrate them")
    if src.resolve() == out.resolve():
        raise ConfigError(f"--reuse-runs {src}: that is this sweep's own folder; give another sweep's folder")
    return src


def units(spec: SweepSpec, cells: list[Cell], extra: list[Cell]) -> list[tuple[Cell, int]]:
    """(cell, seed) runs in order: seed by seed (so a cut-short sweep has whole seeds), baselines
    first, each run once even when several cells share it."""
    units, seen = [], set()
    for seed in spec.seeds:
        for cell in [*extra, *cells]:
            if cell.tuning and cell.tuning.get("over_budget"):
                continue   # no candidate kept the budget: nothing to report
            if (cell.key, seed) not in seen:
                seen.add((cell.key, seed))
                units.append((cell, seed))
    return units
