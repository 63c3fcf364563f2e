"""Skipping non-finite optimizer steps without reading anything back to the host.

A step whose loss or LoRA gradients are not finite must not touch the weights or the optimizer
state. Deciding that on the host costs one device-to-host sync before every optimizer step (6 %
of an OPT-1.3B step on an H200). Here the decision stays on the device:

* ``found_inf``: a 0-dim float32 tensor, 1.0 when the loss or any gradient is not finite (one
  fused max-abs per device and dtype, as ``torch.amp.GradScaler`` does it);
* optimizers that take it (``fused=True`` Adam / AdamW / SGD: ``_step_supports_amp_scaling``)
  skip the update inside their kernel; for any other optimizer the step is taken and undone
  where ``found_inf`` is set: the parameters and their optimizer state are kept before the step
  and put back with ``torch.where`` (state that the skipped step created is reset to zero, which
  for Adam, AdamW, SGD and RMSprop is the same as no state);
* the counts (skipped steps, skipped in a row) are device tensors, read only when reported.

A skipped step still counts as a step of the schedule (the knots, the LR schedule, ``total_steps``),
as with ``GradScaler``: whether a step is a knot is then known without reading the device.
"""

from __future__ import annotations

import math

import torch

from . import _dtensor as dt


class Verdict:
    """What :meth:`cola.Chain.step` returns: true when the step was taken. Evaluating it (``bool``)
    reads one flag from the device; a loop that ignores it pays nothing."""

    __slots__ = ("_found",)

    def __init__(self, found_inf: torch.Tensor | bool):
        self._found = found_inf

    @property
    def flag(self) -> torch.Tensor | bool:
        """The step's skip flag as the device holds it, not read: a 0-dim tensor (1.0 when the step was
        skipped) or a bool (True when skipped); for a loop that reads many steps' flags at once."""
        return self._found

    def __bool__(self) -> bool:
        found = self._found
        return not (bool(found.item() > 0) if isinstance(found, torch.Tensor) else found)

    def __eq__(self, other: object) -> bool:
        return bool(self) == other if isinstance(other, bool) else NotImplemented

    def __hash__(self) -> int:
        return hash(bool(self))

    def __repr__(self) -> str:
        return f"Verdict(taken={bool(self)})"


def found_inf(loss: torch.Tensor | float | None, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 (float32, on ``device``) when ``loss`` or any of ``grads`` is not finite, else 0.0; no host read.

    Under FSDP with sharded factors every rank sees its shard only: the flag is all-reduced (max)."""
    flags = []
    if isinstance(loss, torch.Tensor):
        flags.append((~torch.isfinite(loss.detach().float())).any().to(device))
    elif loss is not None and not math.isfinite(loss):
        flags.append(torch.ones((), dtype=torch.bool, device=device))
    by_group: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        g = dt.local(g.detach())
        by_group.setdefault((g.device, g.dtype), []).append(g)
    for group in by_group.values():
        maxima = torch._foreach_norm(group, math.inf)
        flags.append((~torch.isfinite(torch.stack([m.float() for m in maxima]))).any().to(device))
    flag = torch.stack(flags).any().float() if flags else torch.zeros((), device=device)
    if dt.any_dtensor(grads):
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def _state_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[tuple[dict, str]]:
    return [(optimizer.state[p], k) for p in params if p in optimizer.state
            for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)]


def step_unless(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], found: torch.Tensor) -> None:
    """``optimizer.step()`` that leaves ``params`` and their state untouched where ``found`` is 1."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = found
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    kept_params = [p.detach().clone() for p in params]
    had_state = {id(p) for p in params if p in optimizer.state}
    kept_state = [(slot, key, slot[key].clone()) for slot, key in _state_tensors(optimizer, params)]
    optimizer.step()
    skip = found.to(torch.bool)
    with torch.no_grad():
        for p, old in zip(params, kept_params):
            p.copy_(torch.where(skip.to(p.device), old, p))
        for slot, key, old in kept_state:
            slot[key] = torch.where(skip.to(old.device), old, slot[key])
        for p in params:
            if id(p) not in had_state and p in optimizer.state:
                for key, value in optimizer.state[p].items():
                    if isinstance(value, torch.Tensor):
                        optimizer.state[p][key] = torch.where(skip.to(value.device), torch.zeros_like(value), value)


class Counts:
    """Skipped steps (in all and in a row) as device tensors; :meth:`read` syncs once."""

    def __init__(self) -> None:
        self.total: torch.Tensor | int = 0
        self.in_row: torch.Tensor | int = 0

    def add(self, found: torch.Tensor) -> None:
        self.total = self.total + found
        self.in_row = (self.in_row + 1) * found

    def taken(self) -> None:
        """A step that cannot have been skipped (the guard is off, or it was taken elsewhere)."""
        self.in_row = 0

    def read(self) -> tuple[int, int]:
        values = [int(v.item()) if isinstance(v, torch.Tensor) else int(v) for v in (self.total, self.in_row)]
        self.total, self.in_row = values
        return values[0], values[1]

    def set(self, total: int, in_row: int = 0) -> None:
        self.total, self.in_row = int(total), int(in_row)


class Guarded:
    """The non-finite step handling that :class:`cola.Chain` and ``cola train``'s full fine-tuning share: an
    optimizer step skipped on the device when the loss or a gradient of ``params`` is not finite, and the
    counts of skipped steps. A subclass sets ``optimizer``, ``params`` and ``counts`` (a :class:`Counts`)."""

    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    counts: Counts

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped because the loss or a gradient was not finite (reads the device)."""
        return self.counts.read()[0]

    @property
    def nonfinite_in_row(self) -> int:
        """Of them, the current run of consecutive ones (reads the device)."""
        return self.counts.read()[1]

    def guarded_step(self, loss: torch.Tensor | float | None, skip_nonfinite: bool = True) -> torch.Tensor | bool:
        """``optimizer.step()``, skipped where the loss or a gradient is not finite (decided on the device,
        nothing read back); the skip flag, counted. ``skip_nonfinite=False``: a plain step (flag False)."""
        if not skip_nonfinite:
            self.optimizer.step()
            self.counts.taken()
            return False
        device = self.params[0].device if self.params else torch.device("cpu")
        found = found_inf(loss, [p.grad for p in self.params if p.grad is not None], device)
        step_unless(self.optimizer, self.params, found)
        self.counts.add(found)
        return found

