"""Data-parallel COLA on ``torch.distributed``: DDP-style LoRA training and FSDP2, knots in lock-step.

Launch with ``torchrun --nproc_per_node N script.py`` (or ``accelerate launch``); in the script:

    import cola, cola.distributed as cd
    cd.init()                                   # gloo on CPU, nccl on GPU; no-op for one process
    model = ...                                 # the same base model on every rank
    cola.inject_lora(model, ["q_proj", "v_proj"], rank=8)
    model.to(cd.device())                       # or cd.fsdp(model) to shard the frozen weights
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-4), config)
    cd.attach(chain)                            # lock-step checks at every knot
    for step in range(config.total_steps):
        batch = global_batches[step]            # the global batch: the same list on every rank
        mine = cd.shard(batch)                  # this rank's contiguous slice of it
        loss = loss_fn(model, mine) * cd.loss_scale(len(mine), len(batch))
        loss.backward()
        cd.sync_gradients(chain)                # average the LoRA gradients over the ranks
        chain.step(cd.average(loss))            # the same global loss on every rank
        chain.zero_grad()
    if cd.is_main_process(): cola.save_checkpoint(path, chain.state_dict())

Design. The global batch, the knots and the LR schedule are counted in global optimizer steps,
so every rank ties the same knot at the same step: the chain's step counter advances once per
global step on every rank, the merge policy sees the globally averaged loss (``plateau``), the
re-init strategies draw from the chain's own seeded CPU generator (identical on every rank),
and the optimizer-state policies act on identical state. :func:`attach` adds a cheap check at
every knot (one ``all_gather`` of three int64 per tensor of the LoRA layers: a digest of its
bits) that repairs a drift by broadcasting rank 0's tensors (or raises), so ranks cannot
silently diverge. Every rank must run the same sequence of collectives: call ``chain.step``,
``chain.state_dict()`` under FSDP, and these helpers on every rank.

Gradient synchronisation of the LoRA parameters is an explicit all-reduce (:func:`sync_gradients`:
one flat buffer per device and dtype, averaged) rather than wrapping the model in
``DistributedDataParallel``: a rank schedule replaces a layer's Parameter objects at a knot and
asymmetric re-inits (``rac``) change which factors require gradients, and DDP's reducer is built
for a fixed set of parameters (it would have to be rebuilt at such knots); LoRA gradients are
small (well under 1 % of the model), so overlapping their all-reduce with the backward pass, which
is what DDP buys, saves little; and gradient accumulation needs no ``no_sync``. Full fine-tuning
(no LoRA) uses plain DDP: :func:`ddp`.

FSDP2 (:func:`fsdp`, i.e. ``torch.distributed.fsdp.fully_shard``) shards the frozen base weights;
the LoRA factors stay replicated by default (they are tiny; their gradients are then averaged by
:func:`sync_gradients` like under DDP, and rank schedules work), or are sharded with
``shard_lora=True`` (FSDP reduce-scatters their gradients; a rank change is refused). A knot
merges shard-locally: each rank computes only its own rows of ``B @ A`` (from the gathered
factors when those are sharded) and adds them to its shard of the weight; no rank ever holds the
whole model, and a re-init that needs a whole weight (``pissa``) gathers that one layer.

The parts: :mod:`~cola.distributed.env` (the process group), :mod:`~cola.distributed.collectives`
(slices, averages, gradients), :mod:`~cola.distributed.lockstep` (checks at every knot),
:mod:`~cola.distributed.fsdp` (FSDP2).
"""

from __future__ import annotations

from .collectives import (all_reduce_mean_, any_over_ranks, average, average_and_any, ddp, loss_scale, save_on_main,
                          shard, shard_sizes, sync_gradients)
from .env import (BACKEND_ENV, DistEnv, barrier, default_backend, detect, device, init, is_distributed, is_initialized,
                  is_main_process, local_rank, quiet_non_main, rank, shutdown, world_size)
from .fsdp import fsdp, reshard
from .lockstep import PLUGIN_NAME, LockStep, attach, broadcast_, check, detach, verify_in_sync

__all__ = [
    "BACKEND_ENV", "DistEnv", "LockStep", "PLUGIN_NAME", "all_reduce_mean_", "any_over_ranks", "attach", "average",
    "average_and_any", "barrier",
    "broadcast_", "check", "ddp", "default_backend", "detach", "detect", "device", "fsdp", "init", "is_distributed",
    "is_initialized", "is_main_process", "local_rank", "loss_scale", "quiet_non_main", "rank", "reshard",
    "save_on_main", "shard", "shard_sizes", "shutdown", "sync_gradients", "verify_in_sync", "world_size",
]
