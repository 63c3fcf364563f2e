"""``cola train``'s loop (:func:`cola.llm.experiment.run_experiment`) under torchrun, on the tiny Llama of conftest.py.

Run by tests/llm/test_llm_distributed.py, and importable for the one-process references:

    torchrun --standalone --nproc_per_node 2 tests/llm/dist_run_script.py JOBS_JSON RESULT_PT WATCHED_DIR

``JOBS_JSON``: a list of :class:`TrainSettings` field tables, run one after the other in the same
process group (also launched as two one-rank "nodes": ``torchrun --nnodes 2 --nproc_per_node 1 ...``). For each job rank 0 saves, in ``RESULT_PT``, the results, the final weights of every
LoRA layer (``W0 + merged links + live link``, captured just before the outputs are written) and
the largest difference of those weights between the ranks. Every rank other than 0 records each
file it creates, writes, renames or removes under ``WATCHED_DIR`` (an audit hook): that list must
stay empty.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import build_tokenizer, tiny_llama  # noqa: E402

import cola  # noqa: E402
import cola.distributed as cd  # noqa: E402
from cola.llm import experiment  # noqa: E402
from cola.llm.settings import TrainSettings  # noqa: E402

_captured: list[dict[str, torch.Tensor]] = []
_weight_types: list[str] = []
_original_save_outputs = experiment.save_outputs


def _capture_and_save(settings, run_dir, model, tokenizer, chain):
    """The effective weight of each LoRA layer (every rank calls it: under FSDP it gathers)."""
    weights = {}
    layers = cola.lora_layers(model)
    _weight_types.append(sorted({type(layer.base.weight).__name__ for layer in layers.values()}))
    for name, layer in sorted(layers.items()):
        weights[name] = (layer.exact_weight() + layer.delta_weight()).detach().float().cpu().clone()
    if not layers:   # full fine-tuning: every weight
        weights = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    _captured.append(weights)
    return _original_save_outputs(settings, run_dir, model, tokenizer, chain)


def tiny_loader():
    """A fresh tiny Llama (the same weights each call) and the tiny tokenizer."""
    tok = build_tokenizer()
    vocab = len(tok)
    return lambda: (tiny_llama(vocab), tok)


def run(fields: dict, loader=None) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """``run_experiment`` of ``fields``; returns the results and each run's captured weights."""
    _captured.clear()
    _weight_types.clear()
    experiment.save_outputs = _capture_and_save
    try:
        from_disk = Path(fields.get("model", "")).is_dir()   # a saved folder (a PEFT adapter): cola's own loader
        results = experiment.run_experiment(TrainSettings(**fields),
                                            loader=loader or (None if from_disk else tiny_loader()))
    finally:
        experiment.save_outputs = _original_save_outputs
    return results, list(_captured)


def _watch(root: str, writes: list) -> None:
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags)
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = [args[0], args[1]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and not isinstance(p, int):
                full = os.path.realpath(os.fsdecode(p))
                if full.startswith(root):
                    writes.append(f"{event} {full}")

    sys.addaudithook(hook)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out_file, watched = Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    cd.init()
    writes: list[str] = []
    if not cd.is_main_process():
        _watch(watched, writes)
    import torch.distributed as dist

    per_job = []
    for fields in jobs:
        if fields.pop("_expect_error", False):   # the error must reach every rank (no rank left waiting)
            try:
                run(fields)
                error = None
            except cola.ColaError as err:
                error = f"{type(err).__name__}: {err}"
            errors: list = [None] * cd.world_size()
            dist.all_gather_object(errors, error)
            per_job.append({"errors": errors})
            continue
        results, weights = run(fields)
        flat = torch.cat([w.reshape(-1) for state in weights for w in state.values()]) if weights else torch.zeros(0)
        gathered = [torch.empty_like(flat) for _ in range(cd.world_size())]
        dist.all_gather(gathered, flat)
        rank_diff = max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0 for g in gathered)
        per_job.append({"results": results, "weights": weights, "rank_weight_diff": rank_diff,
                        "weight_types": [t for types in _weight_types for t in types]})
    all_writes: list = [None] * cd.world_size()
    dist.all_gather_object(all_writes, writes)
    launch = {k: os.environ.get(k) for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    launches: list = [None] * cd.world_size()   # each rank's node (GROUP_RANK) and place on it
    dist.all_gather_object(launches, launch)
    if cd.is_main_process():
        torch.save({"jobs": per_job, "world_size": cd.world_size(), "backend": dist.get_backend(),
                    "non_main_writes": [w for ws in all_writes[1:] for w in ws], "launch": launches}, out_file)
    cd.barrier()
    cd.shutdown()


if __name__ == "__main__":
    main()
