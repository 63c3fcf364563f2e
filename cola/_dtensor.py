"""Where a LoRA layer meets FSDP2: helpers for parameters that are ``DTensor`` shards.

Under ``torch.distributed.fsdp.fully_shard`` a module's parameters become ``DTensor`` objects
whose ``to_local()`` is this rank's shard. The chain's knot must then write only the local
shard of each base weight (and never gather a whole model): :func:`low_rank_chunk` computes
just this rank's rows/columns of ``B @ A`` from the (small, gathered) factors, and
:func:`local` is the shard to add it to. Everything here is the identity for ordinary
tensors, and never imports ``torch.distributed.tensor``: if that module was never imported,
no DTensor can exist, so a single-process run pays nothing.

Functions that gather (:func:`full`, :func:`full_copy`, :func:`sum64`, :func:`absmax` on a
DTensor) are collectives: every rank of the tensor's mesh must call them, in the same order.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def dtensor_type() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` has been imported (else no DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: Any) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered (a collective) for a DTensor, ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (aliasing its storage), ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def _region(like) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) of this rank's shard when it is one contiguous box, else None."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) in (Shard, Replicate) for p in like.placements):  # e.g. _StridedShard (FSDP + TP)
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - private helper moved
        return None
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return tuple(shape), tuple(offset)


def local_chunk(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor ``value`` laid out as DTensor ``like``; no communication."""
    if not is_dtensor(like):
        return value
    region = _region(like)
    if region is not None:
        shape, offset = region
        return value[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


def low_rank_chunk(B: torch.Tensor, A: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B @ A`` restricted to this rank's shard of the 2-D weight ``like``.

    For the usual FSDP layout (``Shard(0)``: a block of rows) only the local rows are
    multiplied, so a merge never forms a full ``out x in`` matrix per rank.
    """
    if not is_dtensor(like):
        return B @ A
    region = _region(like)
    if region is None:
        return local_chunk(B @ A, like)
    (rows, cols), (r0, c0) = region
    return B[r0:r0 + rows] @ A[:, c0:c0 + cols]


def from_local_like(t: torch.Tensor, like: torch.Tensor):
    """A DTensor with ``like``'s mesh, placements and global shape whose local shard is ``t``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def full_copy(t: torch.Tensor | None, like: torch.Tensor | None = None) -> torch.Tensor | None:
    """A detached full copy of ``t``: gathered to CPU when ``t`` (or ``like``, whose layout a plain
    local ``t`` shares, e.g. a compensation buffer) is a DTensor; a clone otherwise."""
    if t is None:
        return None
    if is_dtensor(t):
        return t.detach().full_tensor().cpu()
    if like is not None and is_dtensor(like):
        return from_local_like(t.detach(), like).full_tensor().cpu()
    return t.detach().clone()


@torch.no_grad()
def copy_full_(dst: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full tensor ``value`` into ``dst`` (only the local shard when ``dst`` is a DTensor)."""
    target = local(dst)
    target.copy_(local_chunk(value.to(device=target.device, dtype=target.dtype), dst))


def sum64(t: torch.Tensor) -> float:
    """Float64 sum of every element (over all shards for a DTensor)."""
    s = t.detach().double().sum()
    return float(s.full_tensor() if is_dtensor(s) else s)


def absmax(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a 0-dim float32 tensor on ``t``'s (local) device; over all shards for a DTensor."""
    part = local(t.detach())
    value = part.abs().amax().float() if part.numel() else torch.zeros((), device=part.device)
    if is_dtensor(t):
        import torch.distributed as dist

        mesh = t.device_mesh
        for dim in range(mesh.ndim):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return value


def any_dtensor(tensors) -> bool:
    cls = dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def gather_tree(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples, e.g. an optimizer state dict) with every DTensor
    replaced by its full tensor on CPU; returns ``obj`` itself when it holds no DTensor."""
    if dtensor_type() is None:
        return obj

    def walk(x):
        if is_dtensor(x):
            return x.detach().full_tensor().cpu()
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj)


@torch.no_grad()
def redistribute_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a gathered state: shard the state of DTensor params again."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.shape == p.shape:
                    state[key] = from_local_like(local_chunk(value, p).to(local(p).device).clone(), p)


def reshard_fsdp(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state (a no-op without FSDP).

    After a forward pass without backward (evaluation), FSDP leaves the root's parameters, and
    every module's with ``reshard_after_forward=False``, unsharded: the module then holds a
    transient full copy that the next reshard throws away. A merge must write into the shards.
    """
    if dtensor_type() is None:          # nothing was ever sharded in this process
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
