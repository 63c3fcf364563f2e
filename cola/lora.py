"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank link ``scaling * B @ A``.

The layer knows how to fold a low-rank update into its base weight (``fold_``), so merges
happen in place, one layer at a time, accumulating in float32. For low-precision bases
(bf16/fp16) it keeps a compensation buffer (Kahan-style, stored in bfloat16: the weight and its
residual together carry about 16 bits of mantissa): the accumulated weight is
``base.weight + residual``, so the stored weight stays the exact sum rounded once, not m times,
for 2 extra bytes per adapted weight.

Under FSDP2 (``fully_shard``) the base weight, and optionally the factors, are ``DTensor``
shards: ``fold_`` then adds only this rank's rows of the update to the local shard (the
factors are small and gathered when sharded), the compensation buffer holds the local shard's
residual, and ``set_factors_`` writes each rank's chunk. See :mod:`cola.distributed`.

The base may also be transformers' ``Conv1D`` (GPT-2's projections), which stores its weight
transposed (``in x out``, ``y = x @ W + b``). The module itself is kept (a merged model saves as
the same architecture), and everything the layer exposes stays ``out x in``: the factors, the
links, :meth:`LoRALinear.delta_weight` and :meth:`LoRALinear.exact_weight`. Only the stored
weight and its compensation buffer are in the stored layout; :meth:`LoRALinear.oriented` turns one
into the other, and ``fold_`` adds the transposed update.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
import torch.nn.functional as F

from ._dtensor import full, is_dtensor, local, local_chunk, low_rank_chunk, from_local_like
from .errors import ConfigError

_LOW_PRECISION = (torch.bfloat16, torch.float16)

ADAPTABLE = "nn.Linear or Conv1D"
"""What LoRA can wrap, as messages name it: ``nn.Linear`` and transformers' ``Conv1D``."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``in x out``).

    Checked without importing transformers: if it was never imported, no Conv1D can exist.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def is_adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * B(A(dropout(x)))`` with ``base`` frozen.

    Args:
        base: the ``nn.Linear`` (or transformers ``Conv1D``) to adapt; its parameters are frozen.
        rank: rank r of the link, in [1, min(in_features, out_features)].
        alpha: scaling numerator: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the LoRA path's input, in [0, 1).
        rslora: use rank-stabilised scaling.
        lora_dtype: dtype of A and B (default: the base weight's dtype).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, lora_dtype: torch.dtype | None = None):
        super().__init__()
        if not is_adaptable(base):
            raise ConfigError(f"LoRALinear wraps {ADAPTABLE}, got {type(base).__name__}")
        # Conv1D keeps its weight as (in, out); its global shape is the same under FSDP
        self.transposed = is_conv1d(base)
        in_features, out_features = (tuple(base.weight.shape) if self.transposed
                                     else (base.in_features, base.out_features))
        problems = []
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            problems.append(f"alpha={alpha!r}: must be a finite number > 0")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            problems.append(f"dropout={dropout!r}: must be in [0, 1)")
        problems += _rank_problems(rank, in_features, out_features)
        if problems:
            raise ConfigError(problems)
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.rslora = float(alpha), bool(rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = lora_dtype or base.weight.dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Folded links as (B, A, scale), float32 on the weight's device, for export as one adapter.
        self.links: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.record_links = True
        # compensation for low-precision bases (accumulated weight = base.weight + residual): a plain
        # attribute, not a buffer, so that it can live in host memory ("host") while the weight is on
        # an accelerator; "device" keeps it beside the weight.
        self.residual: torch.Tensor | None = None
        self.compensation = "device"

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        r = self.rank
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:.4g}, links_folded={len(self.links)}" + (", conv1d" if self.transposed else ""))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora_x = self.dropout(x).to(self.lora_A.dtype)
        return out + (F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    # ------------------------------------------------------------------ operations
    def oriented(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor laid out as the stored weight (the weight, its compensation, a gradient) as
        ``out x in``, or an ``out x in`` one as stored: the transpose for a Conv1D base (its own
        inverse), ``t`` itself for ``nn.Linear``. Code that reads ``base.weight`` as a matrix goes
        through this, so both layouts give the same answers."""
        return t.transpose(-2, -1) if self.transposed else t

    def delta_weight(self) -> torch.Tensor:
        """The live link's update ``scaling * B @ A`` in float32 (out x in)."""
        B, A = full(self.lora_B.detach()), full(self.lora_A.detach())
        return (B.float() @ A.float()) * self.scaling

    def exact_weight(self) -> torch.Tensor:
        """The base weight as accumulated in float32 (including the compensation buffer), ``out x in``
        whatever the stored layout; gathered (this one layer) when the weight is an FSDP shard."""
        weight = self.base.weight.detach()
        w = local(weight).float()
        if self.residual is not None:
            w = w + self.residual.to(w.device).float()
        return self.oriented(from_local_like(w, weight).full_tensor() if is_dtensor(weight) else w)

    @torch.no_grad()
    def fold_(self, B: torch.Tensor, A: torch.Tensor, scale: float) -> None:
        """Add ``scale * B @ A`` into the base weight, in place, in float32.

        Callers check finiteness first (the chain refuses a non-finite knot before writing);
        this method writes unconditionally. When the weight is an FSDP shard (a DTensor) only
        this rank's part of the update is computed and added to the local shard. ``B`` (out x r)
        and ``A`` (r x in) are as ever; a Conv1D base gets ``(B @ A)^T = A^T @ B^T``, whose rows
        (the shard's) are the weight's rows, so FSDP's row chunks stay local there too.
        """
        B, A = full(B.detach()), full(A.detach())
        acc = torch.float64 if self.base.weight.dtype == torch.float64 else torch.float32
        left, right = (A.T, B.T) if self.transposed else (B, A)
        update = low_rank_chunk(left.to(acc), right.to(acc), self.base.weight).mul_(float(scale))
        weight = local(self.base.weight)
        if weight.dtype in _LOW_PRECISION:
            exact = weight.float()
            if self.residual is not None:
                exact += self.residual.to(exact.device, non_blocking=True)
            exact += update
            weight.copy_(exact)
            self.set_residual_(exact.sub_(weight.float()).to(torch.bfloat16))
        else:
            weight.add_(update)
        if self.record_links:
            self.links.append((B.detach().float().clone(), A.detach().float().clone(), float(scale)))

    @torch.no_grad()
    def set_residual_(self, residual: torch.Tensor | None) -> None:
        """Keep ``residual`` (this rank's part, as the weight is laid out) where ``compensation`` says:
        beside the weight, or in host memory (pinned when CUDA is there, reused from knot to knot) so
        that an accelerator holds nothing more than plain LoRA does."""
        if residual is None:
            self.residual = None
            return
        if self.compensation != "host":
            self.residual = residual.to(local(self.base.weight).device)
            return
        if residual.device.type == "cpu":
            self.residual = residual
            return
        held = self.residual
        if held is None or held.device.type != "cpu" or held.shape != residual.shape or held.dtype != residual.dtype:
            held = torch.empty(residual.shape, dtype=residual.dtype, pin_memory=torch.cuda.is_available())
        held.copy_(residual)
        self.residual = held

    @torch.no_grad()
    def set_factors_(self, A: torch.Tensor, B: torch.Tensor, train_A: bool = True,
                     train_B: bool = True) -> None:
        """Start a new link with factors A (r x in) and B (out x r), possibly of a new rank.

        With an unchanged rank the Parameter objects stay the same (their data is replaced), so
        an optimizer built over them stays attached; a new rank needs new Parameter objects
        (autograd caches a leaf's shape), which :class:`cola.Chain` re-points its optimizer to.
        A factor that FSDP shards (a DTensor) gets this rank's chunk written into its shard; its
        rank cannot change (FSDP owns the Parameter), which is refused before anything is written.
        """
        r = A.shape[0]
        problems = _rank_problems(r, self.in_features, self.out_features)
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            problems.append(f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a rank-{r} "
                            f"link of a {self.out_features}x{self.in_features} weight")
        for attr, value in (("lora_A", A), ("lora_B", B)):
            param = getattr(self, attr)
            if is_dtensor(param) and param.shape != value.shape:
                problems.append(f"{attr}: cannot change the rank of a LoRA factor that FSDP shards "
                                f"({tuple(param.shape)} -> {tuple(value.shape)}); keep the factors replicated "
                                "(cola.distributed.fsdp(model), shard_lora=False) to change ranks")
        if problems:
            raise ConfigError(problems)
        for attr, value, train in (("lora_A", A, train_A), ("lora_B", B, train_B)):
            param = getattr(self, attr)
            value = value.to(device=param.device, dtype=param.dtype)
            if is_dtensor(param):
                local(param).copy_(local_chunk(value, param))
                param.grad = None
            elif param.shape == value.shape:
                param.copy_(value)
                param.grad = None
            else:
                param = nn.Parameter(value.clone())
                setattr(self, attr, param)
            param.requires_grad_(train)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the live link into the base weight and zero B (the function is unchanged)."""
        self.fold_(self.lora_B, self.lora_A, self.scaling)
        self.lora_B.zero_()


def _rank_problems(rank, in_features: int, out_features: int) -> list[str]:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        return [f"rank={rank!r}: must be an integer in [1, {limit}] (min(in={in_features}, out={out_features}))"]
    return []


def stacked_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """All folded links plus the live one as one adapter of scale 1 (float32, on CPU).

    ``W_0 + B_cat @ A_cat`` is the layer's effective weight; the rank is the sum of the links'
    ranks. Needs ``record_links`` to have been on since the start.
    """
    B_live, A_live = full(layer.lora_B.detach()), full(layer.lora_A.detach())
    Bs = [B.cpu() * scale for B, _, scale in layer.links] + [B_live.float().cpu() * layer.scaling]
    As = [A.cpu() for _, A, _ in layer.links] + [A_live.float().cpu()]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)
