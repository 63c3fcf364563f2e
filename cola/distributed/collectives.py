"""Data and gradients across ranks: slices of a global batch, averaged losses and gradients, DDP, saving on rank 0."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import _dtensor as dt
from ..checkpoint import save_checkpoint
from ..errors import ConfigError
from ..io import OutputError
from .env import _comm_device, _dist, _require_group, is_main_process, rank, world_size

log = logging.getLogger("cola.distributed")

# ============================================================================ data

def shard_sizes(n: int, world: int | None = None) -> list[int]:
    """How a global batch of ``n`` items is split: sizes differ by at most one, larger ones first."""
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard(items: Sequence, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous slice of the global batch ``items`` (every rank passes the same list).

    Concatenating the slices of ranks 0..N-1 gives ``items`` back, so a run with N ranks and
    per-rank batch b sees exactly the batches of a one-rank run with batch N*b. A slice is empty
    when ``len(items) < world``; weight the losses with :func:`loss_scale`.
    """
    world = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if not 0 <= r < world:
        raise ConfigError(f"rank {r} outside [0, {world})")
    sizes = shard_sizes(len(items), world)
    start = sum(sizes[:r])
    return list(items[start:start + sizes[r]])


def loss_scale(n_local: float, n_global: float, world: int | None = None) -> float:
    """Factor for this rank's mean loss so that the averaged gradients are the global-batch mean.

    With per-rank means ``L_r`` over ``n_r`` items, ``sum_r (n_r / N) grad L_r`` is the gradient
    of the global mean; :func:`sync_gradients` averages (divides by the world size), so each
    rank scales its loss by ``n_r * world / N`` (1 when the shards are equal). For a token-mean
    loss pass token counts.
    """
    world = world_size() if world is None else world
    if n_global <= 0:
        raise ConfigError(f"global batch size {n_global} must be > 0")
    return float(n_local) * world / float(n_global)


def average(value: torch.Tensor | float, weight: float = 1.0) -> float:
    """The weighted mean over ranks of a scalar: ``sum_r w_r v_r / sum_r w_r`` (the plain mean by default).

    Pass every rank's loss here before ``chain.step(loss)``: loss-driven merge policies
    (``plateau``) and the non-finite guard then see the same number on every rank.
    """
    return average_and_any(value, (), weight)[0]


def average_and_any(value: torch.Tensor | float, flags: Sequence[bool],
                    weight: float = 1.0) -> tuple[float, list[bool]]:
    """:func:`average` of ``value`` and, in the same all-reduce, each of ``flags`` OR-ed over the ranks.

    A loop that averages its loss every step can so agree on a decision taken on one rank (``cola
    train``: a SIGTERM that one rank received stops every rank after the same step) at no extra cost.
    """
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not _require_group():
        return v, [bool(f) for f in flags]
    dist = _dist()
    t = torch.tensor([v * weight, float(weight), *(float(bool(f)) for f in flags)], dtype=torch.float64,
                     device=_comm_device())
    dist.all_reduce(t)
    total, weights, *summed = t.tolist()
    return (total / weights if weights else math.nan), [s > 0 for s in summed]


def any_over_ranks(flags: Sequence[bool]) -> list[bool]:
    """Each of ``flags`` OR-ed over the ranks (one all-reduce); the flags themselves with one process."""
    return average_and_any(0.0, flags)[1]


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks, in place (e.g. a vector of metrics)."""
    if _require_group():
        dist = _dist()
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


# ============================================================================ gradients

def _trainable(target) -> list[nn.Parameter]:
    if hasattr(target, "params") and hasattr(target, "optimizer"):     # a cola.Chain
        params = target.params
    elif isinstance(target, nn.Module):
        params = list(target.parameters())
    else:
        params = list(target)
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def sync_gradients(target, bucket_mb: float = 256.0) -> None:
    """Average the gradients of the trainable parameters over the ranks, in place.

    ``target`` is a :class:`cola.Chain` (its LoRA parameters, re-pointed after rank changes), a
    module or an iterable of parameters. One all-reduce per (device, dtype) of a flat buffer
    (split into buckets of at most ``bucket_mb`` MiB, so a full model's gradients need bounded
    scratch memory); a parameter without a gradient on this rank (e.g. an empty shard of the
    batch) contributes zeros. Gradients that are DTensors (factors sharded by FSDP) are left
    alone: FSDP's reduce-scatter already averaged them. Call it once per optimizer step, after
    the last micro-batch's backward. A no-op with one process.
    """
    if not _require_group():
        return
    dist = _dist()
    world = dist.get_world_size()
    limit = max(1, int(bucket_mb * 2 ** 20))
    groups: dict[tuple, list[list[nn.Parameter]]] = {}
    filled: dict[tuple, int] = {}
    for p in _trainable(target):
        if dt.is_dtensor(p) or dt.is_dtensor(p.grad):
            continue
        key = (p.device, p.dtype)
        buckets = groups.setdefault(key, [[]])
        size = p.numel() * p.element_size()
        if buckets[-1] and filled[key] + size > limit:
            buckets.append([])
            filled[key] = 0
        buckets[-1].append(p)
        filled[key] = filled.get(key, 0) + size
    for buckets in groups.values():
        for params in buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for p in params:
                n = p.numel()
                chunk = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n


def ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel`` for full fine-tuning (no LoRA); returns ``model`` with one process.

    For LoRA chains use :func:`sync_gradients` instead (see the module docstring for why).
    """
    if not _require_group():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if _dist().get_backend() == "nccl":
        kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    return DistributedDataParallel(model, **kwargs)


# ============================================================================ outputs

def save_on_main(path, obj) -> None:
    """Write ``obj`` with :func:`cola.save_checkpoint` on rank 0 only, then wait for it on every rank.

    Under FSDP build ``obj`` (e.g. ``chain.state_dict()``, a collective) on every rank first. When the
    write fails for the machine (a full or read-only disk: :class:`cola.io.OutputError`) every rank
    raises it, none is left waiting.
    """
    error = None
    if is_main_process():
        try:
            save_checkpoint(path, obj)
        except OutputError as err:
            error = err
    if not _require_group():
        if error is not None:
            raise error
        return
    box = [None if error is None else (str(error), error.errno)]
    _dist().broadcast_object_list(box, src=0)   # every rank waits for rank 0's write, as a barrier would
    if error is not None:
        raise error
    if box[0] is not None:
        raise OutputError(f"rank 0 failed: {box[0][0]}", box[0][1], Path(path))
