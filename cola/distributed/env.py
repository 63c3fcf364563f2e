"""The process group: what the launcher set, starting and stopping it, ranks and devices."""

from __future__ import annotations

import atexit
import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import ColaError, ConfigError

log = logging.getLogger("cola.distributed")

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
