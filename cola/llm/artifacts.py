"""What a finished run leaves besides its record: the PEFT adapter of the whole chain, each link's
adapter with a manifest, and (optionally) the merged model.

Rank 0 writes them (the LoRA factors are replicated on every rank; every rank merges its own copy,
so that all end with the same model). Under FSDP each rank merges into its shards and the merged
weights are gathered to rank 0's CPU memory, one tensor at a time, to be written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cola
import cola.distributed as cd
from cola import export
from cola.io import OutputError, atomic_folder
from cola.llm.host import model_source
from cola.llm.parallel import gather_errors, is_sharded
from cola.llm.settings import TrainSettings

log = logging.getLogger(__name__)


def save_adapters(settings: TrainSettings, run_dir: Path, chain) -> dict[str, Any]:
    """The chain as one PEFT adapter (``adapter/``) and each link as its own (``links/``), on rank 0."""
    outputs: dict[str, Any] = {}
    if not (cd.is_main_process() and chain is not None and (settings.save_adapter or settings.save_links)):
        return outputs
    base = model_source(settings)
    if settings.save_adapter:
        outputs["adapter"] = str(export.save_peft_adapter(chain, run_dir / "adapter", base_model_name_or_path=base))
    if settings.save_links:
        outputs["links"] = str(export.save_link_adapters(chain, run_dir / "links", base_model_name_or_path=base))
    return outputs


def save_merged(run_dir: Path, model, tokenizer, chain) -> dict[str, Any]:
    """The merged model (``save_pretrained`` + tokenizer) in ``merged/``; every rank takes part."""
    merged = run_dir / "merged"
    main = cd.is_main_process()
    if chain is not None:
        cola.merge_and_unload(model)
    full = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        cd.reshard(model)   # an evaluation leaves the root unsharded; gather from the shards
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write(folder: Path) -> None:   # into a temporary folder, renamed into place: never half a model
        model.save_pretrained(folder, **({"state_dict": full} if full is not None else {}))
        tokenizer.save_pretrained(folder)

    outputs = {}
    error = None
    if main:
        try:
            outputs["merged"] = str(atomic_folder(merged, write, "merged model"))
        except OutputError as err:   # raised on every rank below, none left waiting
            error = err
    del full
    failed = gather_errors(str(error) if error is not None else None)
    if error is not None:
        raise error
    if failed:
        raise OutputError(f"rank 0 failed: {failed}")
    return outputs


def save_outputs(settings: TrainSettings, run_dir: Path, model, tokenizer, chain) -> dict[str, Any]:
    """Every output of a finished run that ``settings`` asks for; ``{what: path}``."""
    outputs = save_adapters(settings, run_dir, chain)
    if settings.save_merged:
        outputs.update(save_merged(run_dir, model, tokenizer, chain))
    return outputs
