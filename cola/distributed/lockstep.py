"""Lock-step checks: a digest of every LoRA tensor compared across ranks at every knot, repaired or refused."""

from __future__ import annotations

import logging
import weakref
from typing import Iterable

import torch
from torch import nn

from .. import _dtensor as dt
from ..errors import ColaError, ConfigError
from ..hookspecs import hookimpl
from ..inject import lora_layers
from .env import _comm_device, _dist, _require_group, is_distributed

log = logging.getLogger("cola.distributed")

PLUGIN_NAME = "cola.distributed"

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
