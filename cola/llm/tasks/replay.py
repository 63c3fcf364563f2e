"""Replay: text the user wants kept, mixed into every micro-batch of a corpus or facts run.

``--replay-file FILE|embedded:NAME --replay-ratio R`` adds ``max(1, round(R * batch_size))`` blocks of
that text to every micro-batch (:func:`blocks_per_batch`), drawn from a pool of ``replay_blocks`` blocks
in epochs of seeded permutations (:func:`replay_indices`: stateless, so a resumed run replays what an
uninterrupted one would), and adds ``replay_weight`` times their loss to the task's loss:

* ``lm`` (``--replay-loss lm``): the mean NLL of the blocks' tokens, the replay of continual-pretraining
  practice. It trains the model *towards* the replayed text: its loss on text like it goes down while the
  model moves away from where it started;
* ``kl``: the mean KL divergence from the starting model's next-token distributions on the blocks
  (computed once before training, top-k plus the rest's mass: :mod:`cola.llm.divergence`) to the model's
  own, as distillation does: the model is held where it started on that text, not moved towards it.

The replay text and the reference text that forgetting is measured on never share a document
(:func:`separate`): from one source, the replay takes the first half of its documents (in name order)
and the reference the second half, with a warning (forgetting on text like the replay says little);
from two sources, replay documents whose text is also in the reference are dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from cola.errors import ConfigError
from cola.llm.tasks import blocks as corpus
from cola.llm.tasks.corpus_sources import Document
from cola.llm.divergence import StartDistributions, block_log_probs, coarse_kl

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ReplayPool:
    """The replay text of a run: its blocks, the loss on them, how many go into each micro-batch.

    ``start`` holds the starting model's distributions on the blocks (``loss="kl"`` only), set by
    :meth:`with_start` before training.
    """

    blocks: corpus.Blocks
    loss: str
    per_batch: int
    weight: float
    info: dict[str, Any]
    start: StartDistributions | None = None

    @property
    def n_blocks(self) -> int:
        return self.blocks.n_blocks

    def with_start(self, start: StartDistributions) -> "ReplayPool":
        return replace(self, start=start)

    def indices(self, position: int, seed: int) -> np.ndarray:
        """The pool's blocks replayed with global micro-batch ``position`` of the run of ``seed``."""
        return replay_indices(self.n_blocks, self.per_batch, position, seed)

    def summary(self) -> dict[str, Any]:
        return {**self.info, "loss": self.loss, "blocks_per_micro_batch": self.per_batch, "weight": self.weight,
                "pool": {**self.blocks.summary(), "documents": None}}


def blocks_per_batch(ratio: float, batch_size: int) -> int:
    """Replay blocks in a micro-batch of ``batch_size`` training examples: ``max(1, round(ratio * batch_size))``."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ConfigError(f"replay_ratio={ratio!r}: must be a finite number > 0")
    return max(1, int(round(ratio * batch_size)))


def replay_indices(n_blocks: int, per_batch: int, position: int, seed: int) -> np.ndarray:
    """Blocks ``position * per_batch`` to ``(position + 1) * per_batch`` of a stream of seeded permutations of the
    pool (an epoch each), drawn from ``(seed, epoch)`` alone, apart from the training data's own order."""
    if n_blocks < 1 or per_batch < 1 or position < 0:
        raise ConfigError(f"replay_indices needs n_blocks >= 1, per_batch >= 1, position >= 0 (got {n_blocks}, "
                          f"{per_batch}, {position})")
    return corpus.batch_indices(n_blocks, per_batch, position, seed, stream=0x2E91A7)


def replay_loss(model, pool: ReplayPool, index: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The replay loss of the pool's blocks at ``index`` (a scalar with gradients; its mean over their tokens)."""
    rows = torch.as_tensor(np.asarray(index, dtype=np.int64))
    ids = pool.blocks.input_ids[rows]
    if pool.loss == "lm":
        return corpus.lm_loss(model, ids)
    if pool.start is None:
        raise ConfigError("replay loss kl: the starting model's distributions on the replay pool were not computed")
    return coarse_kl(pool.start.rows(rows), block_log_probs(model, ids)).mean()


def separate(replay: Sequence[Document], reference: Sequence[Document], same_source: bool,
             what: str, warn: bool = True) -> tuple[list[Document], list[Document], str]:
    """The replay and reference documents, disjoint (see the module doc), and a note on how.

    Args:
        replay, reference: the documents of the two sources.
        same_source: both are one source (then it is halved).
        what: the sources, for the warning.
        warn: warn when one source is halved (the budget's reference is the replay's source); else log it.
    """
    if same_source:
        docs = sorted(replay, key=lambda d: d.name)
        half = len(docs) // 2
        if half == 0:
            raise ConfigError(f"{what}: one document cannot be both replayed and held out as the reference")
        (log.warning if warn else log.info)(
            "%s: the replay and the reference are the same source: the replay takes the first half of its "
            "documents (%d), the reference the second half (%d). Forgetting on text like the replay says "
            "little about text unlike it: give another --reference-file", what, half, len(docs) - half)
        return docs[:half], docs[half:], f"one source halved: replay the first {half} documents, reference the rest"
    held = {d.text for d in reference}
    kept = [d for d in replay if d.text not in held]
    dropped = len(replay) - len(kept)
    if not kept:
        raise ConfigError(f"{what}: every replay document is also in the reference text; replay other text")
    if dropped:
        log.warning("%s: %d replay documents are also in the reference text and are left out of the replay", what,
                    dropped)
    return kept, list(reference), f"{dropped} replay documents also in the reference left out"
