"""The ``torch.distributed`` bookkeeping of ``cola train``: starting the group, rank 0's decisions,
FSDP's root forward, and the global micro-batch.

Under torchrun / ``accelerate launch`` every rank runs the same ``cola train``. ``batch_size`` is
the *global* micro-batch: every rank draws the same global batches from the seed and trains on
its contiguous slice, weighted by its share (:func:`shares`); the library part
(:mod:`cola.distributed`) averages the LoRA gradients and keeps the chains in lock-step. The
decisions that read the output folder are taken on rank 0 and broadcast (:func:`on_main`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import cola.distributed as cd
from cola.errors import ColaError, ConfigError
from cola.llm.models import resolve_device


def start_distributed(settings: Any) -> torch.device | None:
    """Under torchrun / ``accelerate launch`` with several ranks (or one rank and ``fsdp``): start
    the process group and return this rank's device; ``None`` for a plain single process.

    The backend is gloo when ``settings.device`` is ``cpu``, else :func:`cola.distributed.init`'s
    choice (nccl with CUDA, gloo without; ``$COLA_DIST_BACKEND`` overrides). ``device=cuda`` (or
    unset) means each rank's own GPU, ``cuda:LOCAL_RANK``; one named GPU (``cuda:1``) is refused
    with several ranks. Calling it again does nothing more.
    """
    env = cd.detect()
    if not env.launched or (env.world_size <= 1 and not settings.fsdp):
        return None
    requested = resolve_device(settings.device) if settings.device is not None else None
    if requested is not None and requested.type == "cuda" and requested.index is not None and env.world_size > 1:
        raise ConfigError(f"device={settings.device!r} names one GPU but {env.world_size} processes were launched: "
                          "leave --device unset or pass 'cuda' (each rank then uses cuda:LOCAL_RANK)")
    cd.init(backend="gloo" if requested is not None and requested.type == "cpu" else None)
    if requested is None:
        return cd.device()
    if requested.type == "cuda":
        return torch.device("cuda", cd.local_rank() % torch.cuda.device_count())
    return requested


def shard_model(model) -> None:
    """FSDP2 over ``model`` (LoRA injected; factors replicated), in place, and make
    :func:`as_forward` run FSDP's root hooks: the objective calls the decoder and the LM head
    directly, not ``model.forward``, so without them the root's own weights (embeddings, final
    norm, LM head) would stay sharded. A no-op without a process group."""
    cd.fsdp(model)
    if not cd.is_initialized():
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    model._cola_forward = _call
    register_fsdp_forward_method(model, "_cola_forward")


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def as_forward(model, fn: Callable[[], Any]) -> Any:
    """``fn()`` run as ``model``'s forward: under FSDP inside the root's pre- and post-forward hooks
    (all-gathering its weights, registering its backward hooks on the output), else a plain call."""
    wrapped = getattr(model, "_cola_forward", None)
    return fn() if wrapped is None else wrapped(fn)


def is_sharded(model) -> bool:
    """True when ``model`` was sharded by :func:`shard_model` (its forwards are collectives)."""
    return getattr(model, "_cola_forward", None) is not None


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only, its result (or its error) handed to every rank.

    The decisions that read the output folder (resume checks, completed runs, cached scores) are
    taken once, so that ranks cannot disagree and then wait on each other forever; rank 0's
    :class:`ConfigError` / :class:`ColaError` is raised on every rank. A plain call with one process.
    """
    if not cd.is_distributed():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error = None
    if cd.is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            problems = err.problems if isinstance(err, ConfigError) else [str(err)]
            box[0] = ("config" if isinstance(err, ConfigError) else "error", problems)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "config":
        raise ConfigError(value)
    if kind == "error":
        raise ColaError(f"rank 0 failed: {value[0]}")
    return value


def gather_errors(error: str | None) -> str | None:
    """The first non-empty ``error`` of any rank (every rank gets the same answer); a plain
    pass-through with one process."""
    if not cd.is_distributed():
        return error
    import torch.distributed as dist

    errors: list[Any] = [None] * cd.world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def check_global_batches(settings: Any, n_train: dict[int, int], world: int) -> None:
    """Every micro-batch, the last of an epoch included, must give each of ``world`` ranks at least
    one example (a rank with an empty slice would have nothing to run its forward on)."""
    problems = []
    for seed, n in n_train.items():
        sizes = sorted({min(settings.batch_size, n)} | ({n % settings.batch_size} - {0}), reverse=True)
        if any(b < world for b in sizes):
            problems.append(f"batch_size={settings.batch_size} (the global micro-batch) with {n} training examples "
                            f"(seed {seed}) gives micro-batches of {' and '.join(map(str, sizes))} examples, "
                            f"fewer than the {world} ranks: every rank needs at least one example of each; "
                            f"use batch_size >= {world} with n_train a multiple of it (or leaving a last batch "
                            f"of >= {world})")
    if problems:
        raise ConfigError(problems)


def shares(batch, loss: str) -> float:
    """What a slice of a micro-batch weighs in its mean loss: examples (token blocks of one length), or
    gold-answer tokens (``lm``)."""
    if loss == "lm":
        return float(sum(len(ex.candidates[ex.label]) for ex in batch))
    return float(len(batch))


def describe(device: torch.device, fsdp: bool) -> dict[str, Any]:
    """What ``results.json`` records of a data-parallel run."""
    import torch.distributed as dist

    return {"world_size": cd.world_size(), "backend": dist.get_backend(), "device": str(device), "fsdp": fsdp,
            "launcher": cd.detect().launcher}
