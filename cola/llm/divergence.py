"""How far a model has moved from where it started: the KL divergence to the starting model.

The loss rise on a reference text says whether the model got worse at that text; it can go *down*
while the model moves far (training on text like the reference, e.g. replaying it). The KL
divergence from the starting model's next-token distributions to the current model's, averaged over
the reference's predicted tokens, measures the move itself: it is 0 for the starting model and
positive otherwise.

The starting model's distributions are computed once, before training (after a knot the frozen
weights are no longer the start), and kept compactly (:class:`StartDistributions`): at each position
the ``k`` most likely tokens with their log-probabilities, and the rest of the vocabulary as one
bucket (its mass is what the top ``k`` leave). The KL is that of the coarsened distributions::

    KL = sum_{i in top k} p_i (log p_i - log q_i)  +  p_rest (log p_rest - log q_rest)

with ``p`` the start, ``q`` the model now and ``p_rest``, ``q_rest`` their mass outside the start's top ``k``. Merging the
rest into one bucket can only lower a KL (the log-sum inequality), so this is a lower bound of the
full-vocabulary KL, exact when ``k`` covers the vocabulary, never negative, and exactly 0 when the
model is the start. The same quantity with gradients is the replay loss ``kl``
(:mod:`cola.llm.tasks.replay`): the model is pulled back to the start's distributions on the replayed text,
as distillation does, rather than towards the text's own tokens.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cola.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

#: tokens kept per position by default (the rest of the vocabulary is one bucket)
DEFAULT_TOP_K = 64


@dataclass(frozen=True, eq=False)
class StartDistributions:
    """The starting model's next-token distributions on ``[n, length]`` blocks, compactly.

    Attributes:
        indices: ``[n, length - 1, k]`` int32 token ids, the most likely ``k`` at each predicted position.
        logp: ``[n, length - 1, k]`` float32 their log-probabilities.
        log_rest: ``[n, length - 1]`` float32 the log of the mass left to the rest of the vocabulary
            (``-inf`` when the top ``k`` hold it all).
    """

    indices: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def rows(self, index: torch.Tensor | slice) -> "StartDistributions":
        """The distributions of the blocks at ``index``."""
        return StartDistributions(self.indices[index], self.logp[index], self.log_rest[index])


def _log_rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The log of the mass outside ``index`` (``[..., k]``) of the log-probabilities ``logp`` (``[..., V]``),
    summed over the rest directly (``1 - sum`` of the top would cancel): ``-inf`` when nothing is left."""
    return torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1)


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embedding's device."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def block_log_probs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """``[b, length - 1, V]`` float32 log-probabilities of the next token at each position of ``ids``."""
    logits = model(input_ids=ids.to(input_device(model)), use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def start_distributions(model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 8,
                        k: int = DEFAULT_TOP_K) -> StartDistributions:
    """The :class:`StartDistributions` of ``model`` on the blocks ``input_ids`` (eval mode; restored).

    Batched as :func:`kl_to_start` batches, so that the starting model scores a KL of exactly 0.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ConfigError(f"start_distributions needs blocks [n >= 1, length >= 2], got {tuple(input_ids.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r}: the tokens kept per position must be an integer >= 1")
    was_training = model.training
    model.eval()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            logp = block_log_probs(model, input_ids[start:start + batch_size])
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            parts.append((top.indices.to(torch.int32).cpu(), top.values.cpu(), _log_rest(logp, top.indices).cpu()))
    finally:
        model.train(was_training)
    return StartDistributions(*(torch.cat(x) for x in zip(*parts)))


def coarse_kl(start: StartDistributions, logq: torch.Tensor) -> torch.Tensor:
    """Per position, the KL from the (coarsened) start to ``logq`` (``[..., V]`` log-probabilities, with
    gradients when they have them): ``[...]``, never negative (up to rounding, which is clamped)."""
    index = start.indices.to(logq.device, torch.long)
    logp = start.logp.to(logq.device)
    log_rest_p = start.log_rest.to(logq.device)
    top_q = logq.gather(-1, index)
    log_rest_q = _log_rest(logq, index)
    p = logp.exp()
    top = (p * (logp - top_q)).sum(-1)
    rest_p = log_rest_p.exp()
    # a rest bucket the start gives no mass adds nothing (0 log 0 = 0), whatever q gives it
    rest = torch.where(rest_p > 0, rest_p * (log_rest_p - log_rest_q), torch.zeros_like(rest_p))
    return (top + rest).clamp(min=0.0)


@torch.no_grad()
def kl_to_start(model: PreTrainedModel, input_ids: torch.Tensor, start: StartDistributions, batch_size: int = 8,
                keep: torch.Tensor | None = None) -> float:
    """The mean KL divergence from the start to ``model`` over the predicted tokens of ``input_ids`` (eval
    mode; restored); ``keep`` (``[n, length - 1]`` bool) leaves positions out (document boundaries)."""
    if start.indices.shape[:2] != (input_ids.shape[0], input_ids.shape[1] - 1):
        raise ConfigError(f"the start's distributions cover blocks of shape {tuple(start.indices.shape[:2])} "
                          f"positions, not those of blocks {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for begin in range(0, input_ids.shape[0], batch_size):
            rows = slice(begin, begin + batch_size)
            kl = coarse_kl(start.rows(rows), block_log_probs(model, input_ids[rows])).double().cpu()
            if keep is not None:
                mask = keep[rows]
                total += float(kl[mask].sum())
                count += int(mask.sum())
            else:
                total += float(kl.sum())
                count += kl.numel()
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def ids_fingerprint(ids: torch.Tensor) -> str:
    """A short hash of token blocks."""
    return hashlib.sha1(ids.detach().cpu().numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights (the sum and first values of every tensor): whether cached start
    distributions were computed on these weights."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            flat = tensor.detach().reshape(-1)
            head = flat[:8].double().cpu().tolist()
            digest.update(f"{name}:{tuple(tensor.shape)}:{float(flat.double().sum()):.17g}:{head}".encode())
    return digest.hexdigest()[:16]
