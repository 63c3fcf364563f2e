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
"""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import _dtensor as dt
from .errors import ColaError, ConfigError
from .hookspecs import hookimpl
from .inject import lora_layers
from .lora import LoRALinear

log = logging.getLogger(__name__)

PLUGIN_NAME = "cola.distributed"
BACKEND_ENV = "COLA_DIST_BACKEND"   #: overrides the default backend choice, e.g. gloo on a GPU machine


# ============================================================================ environment

@dataclass(frozen=True)
class DistEnv:
    """What the launcher put in the environment (torchrun and ``accelerate launch`` set the same names)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str | None = None      #: "torchrun", "accelerate" or None (a plain single process)

    @property
    def launched(self) -> bool:
        return self.launcher is not None


#: launcher variables, first found wins: torchrun / accelerate (GPU), then MPI as ``accelerate
#: launch --cpu --mpirun_hostfile`` uses on CPUs (MPICH / Intel MPI, Open MPI, MVAPICH)
_ENV_NAMES = {
    "rank": ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"),
    "world_size": ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"),
    "local_rank": ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    "local_world_size": ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                         "MV2_COMM_WORLD_LOCAL_SIZE"),
}


def _int_env(field: str, default: int) -> int:
    for name in _ENV_NAMES[field]:
        value = os.environ.get(name)
        if value is None or value.strip() == "":
            continue
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def detect() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as set by torchrun or accelerate
    (or the MPI equivalents that ``accelerate launch`` uses for several CPU processes)."""
    if not any(os.environ.get(n) for n in _ENV_NAMES["rank"] + _ENV_NAMES["world_size"]):
        return DistEnv()
    world = _int_env("world_size", 1)
    rank = _int_env("rank", 0)
    local_rank = _int_env("local_rank", rank)
    local_world = _int_env("local_world_size", world)
    problems = []
    if world < 1:
        problems.append(f"WORLD_SIZE={world}: must be >= 1")
    elif not 0 <= rank < world:
        problems.append(f"RANK={rank}: must lie in [0, WORLD_SIZE={world})")
    if not 0 <= local_rank < max(local_world, 1):
        problems.append(f"LOCAL_RANK={local_rank}: must lie in [0, LOCAL_WORLD_SIZE={local_world})")
    if problems:
        raise ConfigError(problems)
    launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "torchrun"
    return DistEnv(rank, world, local_rank, local_world, launcher)


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group with more than one rank is up (collectives do something)."""
    return is_initialized() and _dist().get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_initialized() else detect().rank


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else detect().world_size


def local_rank() -> int:
    return detect().local_rank


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that writes outputs, checkpoints and logs."""
    return rank() == 0


def default_backend() -> str:
    """``nccl`` when CUDA (and NCCL) is available, else ``gloo``."""
    dist = _dist()
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if torch.cuda.is_available() and (not is_initialized() or _dist().get_backend() != "gloo"):
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Start the default process group from the launcher's environment (``env://``).

    ``backend`` defaults to ``$COLA_DIST_BACKEND``, else :func:`default_backend`. A plain
    single process (no launcher variables) starts nothing, and every helper here is then a
    no-op; under a launcher a group is started even for one rank (so :func:`fsdp` works on one
    GPU; the collectives are skipped).
    Calling it again once the group is up does nothing. With NCCL the CUDA device is set to
    ``LOCAL_RANK``. Non-main ranks' ``cola`` logging is lowered to warnings (:func:`quiet_non_main`).
    """
    env = detect()
    dist = _dist()
    if is_initialized() or not env.launched:
        return env
    if not dist.is_available():
        raise ColaError(f"launched with WORLD_SIZE={env.world_size} but this torch build has no torch.distributed")
    backend = backend or os.environ.get(BACKEND_ENV) or default_backend()
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if "nccl" in backend:
        if env.local_rank >= torch.cuda.device_count():
            raise ColaError(f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} CUDA "
                            f"device(s): start one process per GPU (or set {BACKEND_ENV}=gloo to run on CPUs)")
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")   # torchrun and accelerate set both
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            **kwargs)
    atexit.register(shutdown)  # destroy the group while the interpreter is still whole (see shutdown)
    log.info("torch.distributed: rank %d of %d (local rank %d), backend %s, launcher %s", env.rank,
             env.world_size, env.local_rank, dist.get_backend(), env.launcher)
    quiet_non_main()
    return env


def shutdown() -> None:
    """Destroy the default process group, if one is up (registered with ``atexit`` by :func:`init`).

    Then collects garbage at once: with torch 2.13 on gloo, a process that has imported
    ``torch._dynamo`` (creating any torch optimizer does) aborts at interpreter exit in about
    half of the runs ("terminate called without an active exception", SIGABRT) unless the
    group's leftover work objects are freed while the interpreter is still whole.
    """
    if is_initialized():
        _dist().destroy_process_group()
        gc.collect()


def barrier() -> None:
    if is_distributed():
        dist = _dist()
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def quiet_non_main(logger: str = "cola") -> None:
    """Only rank 0 logs progress: other ranks' ``logger`` is set to WARNING."""
    if not is_main_process():
        logging.getLogger(logger).setLevel(logging.WARNING)


def _require_group() -> bool:
    """True if collectives must run; refuses a launched multi-rank run whose group is not up."""
    if is_distributed():
        return True
    if not is_initialized() and detect().world_size > 1:
        raise ColaError(f"launched with WORLD_SIZE={detect().world_size} but torch.distributed is not "
                        "initialised: call cola.distributed.init() first")
    return False


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else torch.device("cpu")


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
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not _require_group():
        return v
    dist = _dist()
    t = torch.tensor([v * weight, float(weight)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    total, weights = t.tolist()
    return total / weights if weights else math.nan


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


# ============================================================================ lock-step checks

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGEST_CHUNK = 1 << 22


def _digest(t: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers from the bits of ``t`` (this rank's shard of a DTensor): equal tensors give
    equal digests; any bit flip changes them."""
    x = dt.local(t.detach()).contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    bits = x.view(_INT_VIEW[x.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=x.device)
    weighted = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, bits.numel(), _DIGEST_CHUNK):       # bounded scratch memory for big weights
        ints = bits[start:start + _DIGEST_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + ints.numel(), device=x.device, dtype=torch.int64) % 8191 + 1
        total += ints.sum()
        weighted += (ints * weights).sum()
    return torch.stack([total, weighted, torch.tensor(bits.numel(), device=x.device)])


def _lora_tensors(model: nn.Module, include_sharded: bool = False) -> dict[str, torch.Tensor]:
    """The replicated tensors of every LoRA layer: factors, and the base weight and compensation
    buffer where they are not FSDP shards (shards differ between ranks by design)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("base.weight", layer.base.weight),
                        ("residual", layer.residual)):
            if t is None:
                continue
            if include_sharded or not (dt.is_dtensor(t) or (part == "residual" and dt.is_dtensor(layer.base.weight))):
                out[f"{name}.{part}"] = t
    return out


def _tensors_of(target) -> dict[str, torch.Tensor]:
    if hasattr(target, "layers") and hasattr(target, "optimizer"):     # a cola.Chain
        return _lora_tensors(target.model)
    if isinstance(target, nn.Module):
        named = dict(target.named_parameters())
        named.update({k: v for k, v in target.named_buffers() if v is not None})
        named.update(_lora_tensors(target))                      # compensation buffers are not registered
        return {k: v for k, v in named.items() if not dt.is_dtensor(v)}
    return dict(target)


@torch.no_grad()
def verify_in_sync(target) -> list[str]:
    """Names of the tensors that differ (bit for bit) between any rank and rank 0; [] when in sync.

    ``target``: a :class:`cola.Chain` (every LoRA layer's factors, plus base weights and
    compensation buffers unless FSDP shards them), a module (every parameter and buffer that is
    not an FSDP shard), or a ``{name: tensor}`` mapping. One ``all_gather`` of three int64 per
    tensor; every rank gets the same answer. Always [] with one process.
    """
    if not _require_group():
        return []
    dist = _dist()
    tensors = _tensors_of(target)
    names = sorted(tensors)
    dev = _comm_device()
    mine = (torch.stack([_digest(tensors[n]).to(dev) for n in names]) if names
            else torch.zeros((0, 3), dtype=torch.int64, device=dev))
    counts = [torch.zeros((), dtype=torch.int64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(len(names), device=dev))
    if len({int(c) for c in counts}) != 1:
        return ["<number of tensors differs between ranks: " + ", ".join(str(int(c)) for c in counts) + ">"]
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    differ = torch.zeros(len(names), dtype=torch.bool, device=dev)
    for other in gathered[1:]:
        differ |= (other != gathered[0]).any(dim=1)
    return [n for n, d in zip(names, differ.tolist()) if d]


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each (non-sharded) tensor with rank ``src``'s copy, in place."""
    if not _require_group():
        return
    dist = _dist()
    dev = _comm_device()
    for t in tensors:
        if dt.is_dtensor(t):
            raise ColaError("broadcast_ got an FSDP shard (DTensor): shards differ between ranks by design")
        if t.device == dev:
            dist.broadcast(t.data, src=src)
        else:
            buf = t.detach().to(dev)
            dist.broadcast(buf, src=src)
            t.data.copy_(buf)


class LockStep:
    """The plugin :func:`attach` registers: after each knot of an attached chain, the LoRA layers
    are checked bit for bit against rank 0 and repaired by broadcast or refused."""

    def __init__(self):
        self.chains: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @hookimpl(tryfirst=True)       # other hooks see the checked (or repaired) layers
    def cola_after_merge(self, chain, report):
        on_mismatch = self.chains.get(chain)
        if on_mismatch is None or not is_distributed():
            return
        check(chain, on_mismatch, f"knot at step {report.step} (link {report.link})")


_LOCKSTEP = LockStep()


def check(chain, on_mismatch: str = "repair", where: str = "now") -> list[str]:
    """Verify the chain's LoRA layers are identical on every rank; ``on_mismatch`` "repair"
    broadcasts rank 0's copies of the differing tensors (with a warning), "raise" refuses.
    Returns the names that differed."""
    differing = verify_in_sync(chain)
    if not differing:
        return []
    shown = ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
    if on_mismatch == "raise" or differing[0].startswith("<"):
        raise ColaError(f"ranks diverged ({where}): {len(differing)} LoRA tensors differ from rank 0: {shown}")
    tensors = _tensors_of(chain)
    broadcast_([tensors[n] for n in differing])
    sharded = any(dt.is_dtensor(layer.base.weight) for layer in chain.layers.values())
    log.warning("ranks diverged (%s): %d LoRA tensors differed from rank 0 and were replaced by its copies: %s%s",
                where, len(differing), shown,
                " (FSDP-sharded base weights cannot be compared; a re-init that folds into the weights, "
                "e.g. pissa, may leave them slightly inconsistent)" if sharded else "")
    return differing


def attach(chain, on_mismatch: str = "repair", check_model: bool = True) -> None:
    """Put ``chain`` under lock-step checks (a no-op with one process).

    Registers the :class:`LockStep` plugin on the chain's plugin manager (once), checks now that
    every rank starts from the same LoRA layers (and, with ``check_model``, the same model: one
    pass over its non-sharded parameters and buffers), and after every knot verifies the
    LoRA layers bit for bit. ``on_mismatch``: "repair" (broadcast rank 0's tensors, warn) or
    "raise". A model that differs at the start always raises: fix the loading / seeding.
    """
    if on_mismatch not in ("repair", "raise"):
        raise ConfigError(f"on_mismatch={on_mismatch!r}: allowed repair, raise")
    if not _require_group():
        return
    if PLUGIN_NAME not in chain.pm.plugin_names():
        chain.pm.register(_LOCKSTEP, PLUGIN_NAME)
    _LOCKSTEP.chains[chain] = on_mismatch
    differing = verify_in_sync(chain.model if check_model else chain)
    if differing:
        raise ColaError(f"ranks start from different models: {len(differing)} tensors differ from rank 0: "
                        + ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
                        + " (load the same weights and seed every rank alike before cola.Chain)")


def detach(chain) -> None:
    """Stop the lock-step checks of ``chain``."""
    _LOCKSTEP.chains.pop(chain, None)


# ============================================================================ FSDP

def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ColaError(f"FSDP2 (fully_shard) is not available in torch {torch.__version__}; "
                            "torch >= 2.4 is needed") from None
    return fully_shard


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks holding LoRA layers (a transformer's decoder layers), else the LoRA layers."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(isinstance(m, LoRALinear) for m in module.modules()):
            return list(module)
    return list(lora_layers(model).values())


def fsdp(model: nn.Module, blocks: Sequence[nn.Module] | None = None, shard_lora: bool = False,
         mesh=None, mp_policy=None, reshard_after_forward: bool = True, **kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``): each block, then the root. Returns ``model``.

    Call after :func:`cola.inject_lora` and before :class:`cola.Chain`. ``blocks`` defaults to
    the modules of the first ``nn.ModuleList`` that holds LoRA layers (a transformer's decoder
    layers), else every LoRA layer. With ``shard_lora=False`` (default) the LoRA factors are
    left out of FSDP (``ignored_params``): replicated, moved to this rank's device, their
    gradients averaged by :func:`sync_gradients`; rank schedules work. With ``shard_lora=True``
    FSDP shards and reduces them too (constant rank only; ``svd-truncate`` merges and
    ``prune`` need replicated factors). ``mesh`` defaults to a 1-D mesh over all ranks on
    :func:`device`'s type; ``mp_policy`` is FSDP's ``MixedPrecisionPolicy``.
    """
    if not is_initialized():
        _require_group()               # refuses a launched multi-rank run without init()
        return model
    fully_shard = _fully_shard()
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("fsdp(): the model has no LoRA layers; call cola.inject_lora first "
                          "(or use fully_shard directly for full fine-tuning)")
    dev = device()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world_size(),))
    lora_params = {p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    if not shard_lora:
        with torch.no_grad():
            for p in lora_params:
                p.data = p.data.to(dev)
    options: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if not shard_lora:
        import inspect

        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ColaError(f"fully_shard of torch {torch.__version__} cannot leave the LoRA factors replicated "
                            "(no ignored_params; torch >= 2.7 has it): use fsdp(model, shard_lora=True)")
        options["ignored_params"] = lora_params
    for block in (_default_blocks(model) if blocks is None else blocks):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP module of ``model`` back into its sharded state (the chain does this itself
    before each knot: after an eval forward the root keeps its parameters unsharded)."""
    dt.reshard_fsdp(model)


# ============================================================================ outputs

def save_on_main(path, obj) -> None:
    """Write ``obj`` with :func:`cola.save_checkpoint` on rank 0 only, then wait for it on every rank.

    Under FSDP build ``obj`` (e.g. ``chain.state_dict()``, a collective) on every rank first.
    """
    from .checkpoint import save_checkpoint

    if is_main_process():
        save_checkpoint(path, obj)
    barrier()
