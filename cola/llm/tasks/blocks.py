"""The corpus task's data and metrics: documents, the split by document, packed blocks, perplexity.

A *corpus task* trains a causal LM with the language-model objective on raw text and scores
it by held-out perplexity on the same domain, plus *forgetting*: the rise of the loss on a
reference text of general language that the run never trains on.

The split by document (:func:`split_documents`)
-----------------------------------------------
Never by block: a document is wholly in one split. Documents are ordered by name (so the
input order does not matter); the **test** documents are drawn in a random order fixed by
``test_seed`` alone (the same for every run seed, like the classification tasks' test set)
and taken until they hold at least ``n_test`` (units of ``size``: tokens in
:func:`prepare_corpus`); then the **validation** documents are drawn the same way from the
rest with the run's ``seed``; every other document is **train**. :func:`prepare_corpus`
counts in blocks: the held-out documents are packed, and if they hold more blocks than asked,
exactly ``n`` blocks evenly spaced among them are kept (a fixed evaluation cost); the rest of
those documents is used by no split.

Packing (:func:`pack_documents`)
--------------------------------
Each document is tokenised without special tokens and followed by the tokenizer's EOS; the
documents are concatenated in order and cut into consecutive blocks of ``block_length``
tokens; the remainder (fewer than ``block_length`` tokens) is dropped. No BOS by default:
blocks start mid-document anyway, and EOS already marks each document's start (OPT's BOS
*is* its EOS). With ``bos=True`` (and a tokenizer that has a BOS) every block is BOS followed
by ``block_length - 1`` corpus tokens. Each token carries the number of UTF-8 bytes of text it
covers (EOS and BOS: 0; a token's bytes run from the previous token's end to its own end, so the
bytes of a document add up exactly), which gives bits per byte, comparable across tokenizers.

Metrics (:func:`evaluate_corpus`, :func:`lm_loss`)
--------------------------------------------------
Inside each block, position ``t`` predicts token ``t + 1`` (the standard shift); the first
token of a block is context only. ``loss`` is the mean token cross-entropy in nats over the
predicted tokens (computed in float32), ``perplexity = exp(loss)``, ``bits_per_byte =
sum of token losses / ln 2 / bytes of the predicted tokens``. :func:`lm_loss` is the same
quantity on one batch, with gradients: the training objective.

Forgetting on many short documents (the tweets) is scored with ``boundary_id=eos``: a fine-tuned model
learns the packing format, which would lower the reference loss and hide it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from cola.errors import ConfigError
from cola.llm.divergence import StartDistributions, block_log_probs, coarse_kl, input_device
from cola.llm.tasks.corpus_sources import Document, _utf8_lengths
from cola.llm.tasks.templates import DataError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ types

@dataclass(frozen=True, eq=False)
class EncodedDocument:
    """A tokenised document: ``ids`` (no special tokens, no EOS) and the UTF-8 bytes per token."""

    name: str
    ids: np.ndarray          # int64 [n_tokens]
    token_bytes: np.ndarray  # int32 [n_tokens], sums to the document's bytes

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, eq=False)
class Blocks:
    """Packed token blocks of one split.

    Attributes:
        input_ids: ``[n_blocks, block_length]`` int64 token ids.
        token_bytes: ``[n_blocks, block_length]`` int32, UTF-8 bytes of text each token covers.
        documents: names of the documents packed, in packing order.
        dropped_tokens: tokens of the packed stream left out (the remainder after the last
            full block, plus blocks not selected by :meth:`evenly`).
    """

    input_ids: torch.Tensor
    token_bytes: torch.Tensor
    documents: tuple[str, ...] = ()
    dropped_tokens: int = 0

    @property
    def n_blocks(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def block_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def block_bytes(self) -> torch.Tensor:
        """``[n_blocks]``: UTF-8 bytes of the text each block covers."""
        return self.token_bytes.sum(dim=1)

    @property
    def target_bytes(self) -> int:
        """Bytes of the tokens that are predicted (all but each block's first): the bits-per-byte
        denominator."""
        return int(self.token_bytes[:, 1:].sum())

    def select(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Blocks:
        """The blocks at ``indices`` (same documents list; dropped tokens updated)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        left_out = (self.n_blocks - int(index.numel())) * self.block_length
        return Blocks(self.input_ids[index], self.token_bytes[index], self.documents,
                      self.dropped_tokens + max(left_out, 0))

    def evenly(self, n: int | None) -> Blocks:
        """At most ``n`` blocks, evenly spaced over all of them (all when ``n`` is None or larger)."""
        if n is None or n >= self.n_blocks:
            return self
        return self.select(evenly_spaced(self.n_blocks, n))

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts: blocks, tokens, bytes, documents (names included)."""
        return {"n_blocks": self.n_blocks, "block_length": self.block_length,
                "tokens": self.n_blocks * self.block_length, "bytes": int(self.token_bytes.sum()),
                "dropped_tokens": self.dropped_tokens, "n_documents": len(self.documents),
                "documents": list(self.documents)}


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


@dataclass(frozen=True)
class DocumentSplit(Generic[T]):
    """Documents (or encoded documents) of each split; see :func:`split_documents`."""

    train: tuple[T, ...]
    validation: tuple[T, ...]
    test: tuple[T, ...]

    def names(self) -> dict[str, list[str]]:
        """``{"train": [...], "validation": [...], "test": [...]}``: document names per split."""
        return {split: [d.name for d in getattr(self, split)] for split in ("train", "validation", "test")}


@dataclass(frozen=True, eq=False)
class CorpusSplits:
    """The packed blocks of train / validation / test and how they were made.

    ``settings`` holds ``block_length``, ``n_val_blocks``, ``n_test_blocks``, ``seed``,
    ``test_seed`` and ``bos``.
    """

    train: Blocks
    validation: Blocks
    test: Blocks
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the settings and, per split, counts and document names."""
        return {"settings": dict(self.settings),
                **{split: getattr(self, split).summary() for split in ("train", "validation", "test")}}


# ------------------------------------------------------------------------------------ splitting

def split_documents(documents: Sequence[T], n_test: int, n_val: int, *, seed: int = 0, test_seed: int = 0,
                    size: Callable[[T], int] | None = None) -> DocumentSplit[T]:
    """Train / validation / test documents (see the module doc): test by ``test_seed`` alone.

    Args:
        documents: items with a unique ``name`` (:class:`Document` or :class:`EncodedDocument`).
        n_test, n_val: how much each held-out split holds at least, in units of ``size``
            (0: an empty split).
        seed: the run's seed (draws validation).
        test_seed: draws the test documents; fixed across the runs of a comparison.
        size: the size of one document; default its UTF-8 bytes (``n_bytes``), or its
            ``n_tokens`` + 1 (EOS) for encoded documents.

    Raises:
        DataError: repeated names, or not enough documents for the held-out splits and a
            non-empty train split.
    """
    for name, value in (("n_test", n_test), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r}: must be an integer >= 0")
    if size is None:
        size = _default_size
    order = sorted(range(len(documents)), key=lambda i: documents[i].name)
    names = [documents[i].name for i in order]
    repeated = sorted({a for a, b in zip(names, names[1:]) if a == b})
    if repeated:
        raise DataError(f"document names must be unique; repeated: {repeated[:5]}")
    sizes = [size(documents[i]) for i in order]
    test = _take(np.random.default_rng([test_seed, 1]).permutation(len(order)), sizes, n_test)
    tested = set(test)
    rest = [i for i in range(len(order)) if i not in tested]
    val_draw = np.random.default_rng([seed, 0]).permutation(len(rest))
    val = [rest[j] for j in _take(val_draw, [sizes[i] for i in rest], n_val)]
    held = set(test) | set(val)
    train = [i for i in range(len(order)) if i not in held]
    problems = []
    for split, chosen, wanted in (("test", test, n_test), ("validation", val, n_val)):
        got = sum(sizes[i] for i in chosen)
        if got < wanted:
            problems.append(f"the {split} split needs {wanted} but the documents left hold {got}")
    if not train:
        problems.append("no document is left for training")
    if problems:
        raise DataError(f"{len(order)} documents are too few to split by document: " + "; ".join(problems)
                        + ". Use smaller held-out sizes, more documents, or (one text file) "
                          "sample_by='paragraph'")
    pick = [documents[i] for i in order]
    return DocumentSplit(tuple(pick[i] for i in train), tuple(pick[i] for i in val), tuple(pick[i] for i in test))


def _default_size(doc: Any) -> int:
    if isinstance(doc, EncodedDocument):
        return doc.n_tokens + 1
    return doc.n_bytes


def _take(draw: np.ndarray, sizes: Sequence[int], needed: int) -> list[int]:
    """Indices from ``draw``, in order, until their sizes add up to at least ``needed``."""
    chosen, total = [], 0
    for index in draw:
        if total >= needed:
            break
        chosen.append(int(index))
        total += sizes[int(index)]
    return chosen


# ------------------------------------------------------------------------------------ tokenising

def encode_documents(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase,
                     batch_size: int = 1024) -> list[EncodedDocument]:
    """Token ids (without special tokens) and bytes per token of each document.

    A token's bytes are the UTF-8 bytes of the text from the previous token's end to its own
    end (from the tokenizer's offsets; the last token also takes any text after it), so the
    bytes of a document add up to its :attr:`Document.n_bytes`. A tokenizer without offsets
    (a slow one) spreads the document's bytes evenly over its tokens instead.
    """
    encoded: list[EncodedDocument] = []
    warned = False
    # a fast tokenizer's Rust tokenizer encodes as its call does (unless it truncates or pads by itself)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    backend = None if backend is None or backend.truncation or backend.padding else backend
    for start in range(0, len(documents), batch_size):
        chunk = documents[start:start + batch_size]
        texts = [doc.text for doc in chunk]
        if backend is not None:   # the Rust tokenizer itself: the same ids and offsets, without a Python object each
            found = backend.encode_batch(texts, add_special_tokens=False)
            all_ids, offsets = [e.ids for e in found], [e.offsets for e in found]
        else:
            try:
                batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                all_ids, offsets = batch["input_ids"], batch["offset_mapping"]
            except (NotImplementedError, ValueError, TypeError):
                all_ids, offsets = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"], None
                if not warned:
                    logger.info("%s gives no offsets: spreading each document's bytes evenly over its tokens",
                                type(tokenizer).__name__)
                    warned = True
        for i, doc in enumerate(chunk):
            ids = np.asarray(all_ids[i], dtype=np.int64)
            total = doc.n_bytes
            if len(ids) == 0:
                per = np.zeros(0, dtype=np.int64)
            elif offsets is None:
                per = np.full(len(ids), total // len(ids), dtype=np.int64)
                per[len(ids) - total % len(ids):] += 1
            else:
                ends = np.maximum.accumulate(np.fromiter((end for _, end in offsets[i]), np.int64, len(ids)))
                if doc.text.isascii():
                    byte_ends = ends
                else:
                    cumulative = np.concatenate([[0], np.cumsum(_utf8_lengths(doc.text))])
                    byte_ends = cumulative[np.minimum(ends, len(cumulative) - 1)]
                per = byte_ends.copy()
                per[1:] -= byte_ends[:-1]
                per[-1] += total - int(byte_ends[-1])
            encoded.append(EncodedDocument(doc.name, ids, per.astype(np.int32)))
    return encoded


def special_ids(tokenizer: PreTrainedTokenizerBase, bos: bool = False) -> tuple[int, int | None]:
    """``(eos_id, bos_id)`` for packing; ``bos_id`` is None unless ``bos`` is asked for.

    Raises:
        ConfigError: the tokenizer has no EOS token, or ``bos`` without a BOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no EOS token to separate documents; "
                          f"set tokenizer.eos_token")
    if not bos:
        return int(eos), None
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"bos=True but {type(tokenizer).__name__} has no BOS token")
    return int(eos), int(tokenizer.bos_token_id)


def pack_documents(encoded: Sequence[EncodedDocument], block_length: int, eos_id: int,
                   bos_id: int | None = None) -> Blocks:
    """Documents joined, each followed by ``eos_id``, cut into blocks (see the module doc).

    With ``bos_id`` each block is ``bos_id`` followed by ``block_length - 1`` corpus tokens.
    The remainder after the last full block is dropped (counted in ``dropped_tokens``).
    """
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 2:
        raise ConfigError(f"block_length={block_length!r}: must be an integer >= 2")
    eos = np.asarray([eos_id], dtype=np.int64)
    ids = np.concatenate([part for doc in encoded for part in (doc.ids, eos)]) if encoded else \
        np.zeros(0, dtype=np.int64)
    nbytes = np.concatenate([part for doc in encoded for part in (doc.token_bytes, np.zeros(1, np.int32))]) \
        if encoded else np.zeros(0, dtype=np.int32)
    body = block_length - (bos_id is not None)
    n_blocks = len(ids) // body
    ids_2d = ids[:n_blocks * body].reshape(n_blocks, body)
    bytes_2d = nbytes[:n_blocks * body].reshape(n_blocks, body).astype(np.int32)
    if bos_id is not None:
        ids_2d = np.concatenate([np.full((n_blocks, 1), bos_id, dtype=np.int64), ids_2d], axis=1)
        bytes_2d = np.concatenate([np.zeros((n_blocks, 1), dtype=np.int32), bytes_2d], axis=1)
    return Blocks(torch.from_numpy(np.ascontiguousarray(ids_2d)), torch.from_numpy(np.ascontiguousarray(bytes_2d)),
                  tuple(doc.name for doc in encoded), len(ids) - n_blocks * body)


def evenly_spaced(n_items: int, n: int) -> np.ndarray:
    """``n`` distinct indices spread evenly over ``range(n_items)`` (all of them if ``n >= n_items``)."""
    if n >= n_items:
        return np.arange(n_items)
    return np.floor((np.arange(n) + 0.5) * n_items / n).astype(np.int64)


def prepare_corpus(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, block_length: int,
                   n_val_blocks: int, n_test_blocks: int, *, seed: int = 0, test_seed: int = 0,
                   bos: bool = False, encoded: Sequence[EncodedDocument] | None = None) -> CorpusSplits:
    """Tokenise, split by document and pack: the blocks of train, validation and test.

    The held-out splits are whole documents holding at least ``n_*_blocks`` blocks, of which
    exactly that many (evenly spaced) are kept. ``encoded`` reuses an earlier
    :func:`encode_documents` of the same ``documents`` (the tokenising is the slow part).

    Raises:
        DataError: too few documents for the requested held-out sizes.
    """
    eos_id, bos_id = special_ids(tokenizer, bos)
    encoded = list(encoded) if encoded is not None else encode_documents(documents, tokenizer)
    per_block = block_length - (bos_id is not None)
    split = split_documents(encoded, n_test_blocks * per_block, n_val_blocks * per_block, seed=seed,
                            test_seed=test_seed, size=lambda d: d.n_tokens + 1)
    test = pack_documents(split.test, block_length, eos_id, bos_id).evenly(n_test_blocks)
    validation = pack_documents(split.validation, block_length, eos_id, bos_id).evenly(n_val_blocks)
    train = pack_documents(split.train, block_length, eos_id, bos_id)
    if train.n_blocks == 0:
        raise DataError(f"the training documents hold fewer than one block of {block_length} tokens")
    settings = {"block_length": block_length, "n_val_blocks": n_val_blocks, "n_test_blocks": n_test_blocks,
                "seed": seed, "test_seed": test_seed, "bos": bos_id is not None}
    logger.info("corpus split by document: train %d docs / %d blocks, validation %d / %d, test %d / %d",
                len(train.documents), train.n_blocks, len(validation.documents), validation.n_blocks,
                len(test.documents), test.n_blocks)
    return CorpusSplits(train, validation, test, settings)


def prepare_reference(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, block_length: int,
                      n_blocks: int | None = None, bos: bool = False, encoded=None) -> Blocks:
    """Every document packed (in order; ``encoded``: their :func:`encode_documents`, if known); at most
    ``n_blocks`` evenly spaced blocks kept."""
    encoded = encoded if encoded is not None else encode_documents(documents, tokenizer)
    blocks = pack_documents(encoded, block_length, *special_ids(tokenizer, bos)).evenly(n_blocks)
    if blocks.n_blocks == 0:
        raise DataError(f"the reference text holds fewer than one block of {block_length} tokens")
    return blocks


def batch_indices(n_blocks: int, batch_size: int, step: int, seed: int = 0, stream: int = 2) -> np.ndarray:
    """The training blocks of step ``step`` (0-based): epochs of seeded permutations (from ``(seed, stream,
    epoch)``; another ``stream``, another order: the replay's), read in order.

    Stateless, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    if n_blocks < 1 or batch_size < 1:
        raise ConfigError(f"batch_indices needs n_blocks >= 1 and batch_size >= 1 (got {n_blocks}, {batch_size})")
    out, position = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_blocks)
        permutation = np.random.default_rng([seed, stream, epoch]).permutation(n_blocks)
        take = min(batch_size - len(out), n_blocks - offset)
        out.extend(permutation[offset:offset + take].tolist())
        position += take
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------ metrics

def lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy of a batch of blocks ``[batch, length]`` (next-token shift inside each).

    ``reduction="mean"`` is the training objective (mean over ``batch * (length - 1)``
    predicted tokens); ``"sum"`` the total in nats; ``"none"`` one value per predicted token
    (``[batch * (length - 1)]``). Computed in float32 from one batch of logits.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ConfigError(f"lm_loss needs blocks [batch, length >= 2], got shape {tuple(input_ids.shape)}")
    ids = input_ids.to(input_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    targets = ids[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction=reduction)


def evaluate_corpus(model: PreTrainedModel, blocks: Blocks | torch.Tensor, batch_size: int = 8,
                    token_bytes: torch.Tensor | None = None,
                    boundary_id: int | None = None,
                    start: StartDistributions | None = None) -> dict[str, float | int | None]:
    """Held-out LM metrics of ``model`` on ``blocks`` (eval mode, no gradients; mode restored).

    Args:
        blocks: :class:`Blocks`, or a ``[n, length]`` id tensor (then ``token_bytes``, same
            shape, gives bits per byte; without it ``bits_per_byte`` and ``bytes`` are None).
        batch_size: blocks per forward (one batch of float32 logits at a time).
        boundary_id: when given (the EOS id of the packing), targets equal to it and right after it are left
            out: document boundaries, whose prediction a fine-tuned model learns from the packing format
            rather than the text (use it for forgetting on a reference of many short documents).

    Returns:
        ``loss`` (mean token cross-entropy, nats), ``perplexity``, ``bits_per_byte``,
        ``tokens`` (predicted tokens scored), ``bytes`` (their UTF-8 bytes), ``n_blocks``; with ``start`` (the start's
        distributions on these blocks, :mod:`cola.llm.divergence`) ``kl``, its mean KL to ``model`` there.
    """
    if isinstance(blocks, Blocks):
        ids, token_bytes = blocks.input_ids, blocks.token_bytes
    else:
        ids = blocks
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DataError(f"nothing to evaluate: blocks of shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be >= 1")
    keep = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    if boundary_id is not None:
        keep = (ids[:, 1:] != boundary_id) & (ids[:, :-1] != boundary_id)
    tokens = int(keep.sum())
    if tokens == 0:
        raise DataError("nothing to evaluate: every target is a document boundary")
    was_training = model.training
    if start is not None and start.indices.shape[:2] != keep.shape:
        raise ConfigError(f"the start's distributions cover {tuple(start.indices.shape[:2])}, not {tuple(keep.shape)}")
    model.eval()
    total = kl_total = 0.0
    try:
        with torch.no_grad():
            for first in range(0, ids.shape[0], batch_size):
                batch, rows = ids[first:first + batch_size], slice(first, first + batch_size)
                if start is not None:   # one forward for both: the tokens' NLL and the KL to the start
                    logp = block_log_probs(model, batch)
                    nll = -logp.gather(-1, batch[:, 1:, None].to(logp.device))[..., 0]
                    kl_total += float(coarse_kl(start.rows(rows), logp).double()[keep[rows].to(nll.device)].sum())
                else:
                    nll = lm_loss(model, batch, reduction="none").view(batch.shape[0], -1)
                total += float(nll.double()[keep[rows].to(nll.device)].sum())
    finally:
        model.train(was_training)
    loss = total / tokens
    n_bytes = int(token_bytes[:, 1:][keep].sum()) if token_bytes is not None else None
    result = {"loss": loss, "perplexity": math.exp(loss) if not loss >= 700 else math.inf,  # NaN stays NaN
              "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
              "tokens": tokens, "bytes": n_bytes, "n_blocks": int(ids.shape[0])}
    if start is not None:
        result["kl"] = kl_total / tokens
    return result


def forgetting(zero_shot: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """How much worse ``after`` is than ``zero_shot`` on the reference text (positive = forgot).

    Returns ``loss_rise`` (nats per token), ``perplexity_ratio`` and ``bits_per_byte_rise``.
    """
    bpb = (after["bits_per_byte"] - zero_shot["bits_per_byte"]
           if after.get("bits_per_byte") is not None and zero_shot.get("bits_per_byte") is not None else None)
    return {"loss_rise": after["loss"] - zero_shot["loss"],
            "perplexity_ratio": after["perplexity"] / zero_shot["perplexity"], "bits_per_byte_rise": bpb}


__all__ = ["Blocks", "CorpusSplits", "DocumentSplit", "EncodedDocument", "batch_indices", "encode_documents",
           "evaluate_corpus", "evenly_spaced", "forgetting", "lm_loss", "pack_documents", "prepare_corpus",
           "prepare_reference", "special_ids", "split_documents"]
