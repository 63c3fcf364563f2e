"""What a corpus or facts run keeps and measures its keeping on: the reference texts (the loss rise and the KL
to the start), the other references, the replay pool, and where the run started.

The reference is by default from another source than the replay (:func:`reference_source`); a replay and a
reference of one source never share a document (:func:`cola.llm.tasks.replay.separate`). The starting model's
distributions on each text are computed once, before training (:class:`StartPoint`): after a knot the frozen
weights are no longer the start. The texts read and tokenised are kept for the next run of the process (a sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import cola.distributed as cd
from cola.llm import divergence
from cola.llm.divergence import StartDistributions
from cola.llm.parallel import as_forward
from cola.llm.tasks import blocks as text_blocks, replay, token_cache
from cola.llm.tasks import corpus_sources
from cola.llm.tasks.corpus_sources import EMBEDDED_CORPORA, EMBEDDED_PREFIX, embedded_name_problem
from cola.llm.tasks.replay import ReplayPool

__all__ = ["DEFAULT_REFERENCE", "OTHER_REFERENCE", "ForgettingTexts", "ReferenceScoring", "StartPoint", "cached",
           "forgetting_texts", "kl_text", "reference_problems", "reference_source", "tokenizer_id"]


#: the default reference text of forgetting, and the one used when that text is the replay
DEFAULT_REFERENCE = "embedded:tweets"
OTHER_REFERENCE = "embedded:python-docs"


def reference_source(settings: Any) -> str:
    """The reference text's source: ``reference_file``, else the embedded tweets, else (when the tweets are the
    replay) the Python reference manual: by default never the replay's own source."""
    if settings.reference_file:
        return settings.reference_file
    return OTHER_REFERENCE if settings.replay_file == DEFAULT_REFERENCE else DEFAULT_REFERENCE


@dataclass(frozen=True, eq=False)
class ForgettingTexts:
    """What a corpus or facts run keeps, and what it measures the keeping on: the reference blocks (loss rise and
    KL to the start), the other references (``more_references``), and the replay pool."""

    reference: text_blocks.Blocks
    more: dict[str, text_blocks.Blocks]
    replay: ReplayPool | None
    info: dict


def _read(path: str):
    return cached(("read", path), lambda: corpus_sources.load_corpus(path), path)  # its own files/text defaults


def tokenizer_id(tokenizer) -> tuple:
    return getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__


def _blocks(tag: str, documents, fingerprint: str, path: str, tokenizer, block: int,
            n: int | None) -> text_blocks.Blocks:
    def make():   # tokenised once per tokenizer on disk for the embedded texts (cola.llm.tasks.token_cache)
        encoded = token_cache.encoded_documents(documents, fingerprint, tokenizer, path)
        return text_blocks.prepare_reference(documents, tokenizer, block, n, encoded=encoded)

    return cached((tag, fingerprint, tokenizer_id(tokenizer), block, n), make, path)


def forgetting_texts(settings: Any, tokenizer, block: int, n_blocks: int | None) -> ForgettingTexts:
    """The reference text (``n_blocks`` blocks of ``block`` tokens), the other references and the replay pool of
    ``settings``, the replay never sharing a document with a reference (:func:`cola.llm.tasks.replay.separate`)."""
    ref_path = reference_source(settings)
    ref_text = _read(ref_path)
    sources = {ref_path: ref_text, **{p: _read(p) for p in settings.more_references}}
    documents = {p: (t.documents, t.info.fingerprint) for p, t in sources.items()}
    pool, replay_info = None, None
    if settings.replay_file:
        rep_text = _read(settings.replay_file)
        rep_docs, fp = rep_text.documents, rep_text.info.fingerprint
        same = [p for p, t in sources.items() if t.info.fingerprint == fp]
        if same:   # the replay keeps the first half of that source, each such reference the second
            rep_docs, held, note = replay.separate(rep_docs, rep_docs, True, f"replay {settings.replay_file} and "
                                                   f"reference {', '.join(same)}", warn=ref_path in same)
            for p in same:
                documents[p] = (held, f"{fp}:second-half")
            fp = f"{fp}:first-half"
        else:
            rep_docs, _, note = replay.separate(rep_docs, ref_text.documents, False,
                                                f"replay {settings.replay_file} and reference {ref_path}")
            fp = f"{fp}:without:{ref_text.info.fingerprint}"
        pool_blocks = _blocks("replay", rep_docs, fp, settings.replay_file, tokenizer, block, settings.replay_blocks)
        per_batch = replay.blocks_per_batch(settings.replay_ratio, settings.batch_size)
        replay_info = {"source": rep_text.info.to_dict(), "separation": note, "n_documents": len(rep_docs)}
        pool = replay.ReplayPool(pool_blocks, settings.replay_loss, per_batch, settings.replay_weight, replay_info)
    made = {p: _blocks("reference", docs, fp, p, tokenizer, block, n_blocks) for p, (docs, fp) in documents.items()}
    info = {"reference": ref_text.info.to_dict(), "reference_blocks": {**made[ref_path].summary(), "documents": None},
            "reference_documents": len(documents[ref_path][0])}
    if settings.more_references:
        info["more_references"] = {p: sources[p].info.to_dict() for p in settings.more_references}
    if pool is not None:
        info["replay"] = pool.summary()
    return ForgettingTexts(made[ref_path], {p: made[p] for p in settings.more_references}, pool, info)


_CACHE: dict[tuple, object] = {}
#: entries kept, the least recently used dropped first: a facts run with replay and two more references uses
#: about ten (texts read, their blocks, the facts and their encodings), so every cell of a sweep finds them
_CACHE_SIZE = 24


def cached(key: tuple, make, path: str | None = "embedded:"):
    """``make()``, kept for the next run of the same process (a sweep, a dry run of many cells): the
    embedded corpora (read) and anything keyed by a corpus's content fingerprint (tokenised). A user's
    file (``path`` not ``embedded:...``) is read again each time: it may have changed."""
    if path is not None and not str(path).startswith(corpus_sources.EMBEDDED_PREFIX):
        return make()
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    _CACHE[key] = _CACHE.pop(key)   # the most recently used last
    return _CACHE[key]


#: start distributions computed in this process, by (weights, blocks, batch size, k): a sweep's runs share them
_STARTS: dict[tuple, StartDistributions] = {}


class StartPoint:
    """Where a corpus or facts run started: the starting model's distributions on each reference text (and
    on the replay pool for ``--replay-loss kl``), computed once before training (:mod:`cola.llm.divergence`),
    from which the evaluations read the KL to the start."""

    def __init__(self, settings: Any):
        self.batch_size, self.k = settings.eval_batch_size, settings.kl_top_k
        self.found: dict[int, tuple[Any, StartDistributions]] = {}

    def compute(self, model, blocks, weights: str | None = None) -> StartDistributions:
        """The start's distributions on ``blocks`` (:class:`cola.llm.tasks.blocks.Blocks`), computed once;
        ``weights`` (:func:`cola.llm.divergence.weights_fingerprint` of ``model``) lets a later experiment of this
        process (the next run of a sweep) on the same weights and blocks reuse them."""
        if id(blocks) not in self.found:
            key = (weights, divergence.ids_fingerprint(blocks.input_ids), self.batch_size, self.k)
            dist = _STARTS.get(key) if weights is not None else None
            if dist is None:
                dist = as_forward(model, lambda: divergence.start_distributions(model, blocks.input_ids,
                                                                                self.batch_size, self.k))
                if weights is not None:
                    while len(_STARTS) >= 8:
                        _STARTS.pop(next(iter(_STARTS)))
                    _STARTS[key] = dist
            self.found[id(blocks)] = (blocks, dist)
        return self.found[id(blocks)][1]

    def get(self, blocks) -> StartDistributions | None:
        entry = self.found.get(id(blocks))
        return entry[1] if entry is not None else None


_REFERENCE_KEYS = ("loss", "perplexity", "bits_per_byte", "tokens", "n_blocks")


class ReferenceScoring:
    """The reference texts' part of an evaluation: loss (and perplexity, bits per byte) and KL to the start of
    the reference, and of the other references of a test set."""

    settings: Any
    eos_id: int
    start: StartPoint | None

    def score(self, model, blocks, boundary: int | None) -> dict[str, Any]:
        """:func:`cola.llm.tasks.blocks.evaluate_corpus` (with the KL to the start where it is known), split over
        the ranks when data-parallel (every rank runs as many forwards, a filler one when its slice is shorter:
        under FSDP each is a collective)."""
        size = self.settings.eval_batch_size
        start = self.start.get(blocks) if self.start is not None else None
        if not cd.is_distributed():
            return as_forward(model, lambda: text_blocks.evaluate_corpus(model, blocks, size, boundary_id=boundary,
                                                                    start=start))
        import torch.distributed as dist

        mine = cd.shard(list(range(blocks.n_blocks)))
        n_batches = math.ceil(max(cd.shard_sizes(blocks.n_blocks)) / size)
        sums = torch.zeros(4, dtype=torch.float64)
        for b in range(n_batches):
            index = mine[b * size:(b + 1) * size]
            rows = index if index else [0]
            part = blocks.select(rows)
            part_start = start.rows(torch.tensor(rows)) if start is not None else None
            r = as_forward(model, lambda: text_blocks.evaluate_corpus(model, part, size, boundary_id=boundary,
                                                                 start=part_start))
            if index:
                sums += torch.tensor([r["loss"] * r["tokens"], r["tokens"], r["bytes"] or 0,
                                      r.get("kl", 0.0) * r["tokens"]], dtype=torch.float64)
        sums = sums.to(cd.device())
        dist.all_reduce(sums)
        total, tokens, n_bytes, kl = sums.tolist()
        loss = total / tokens
        result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                  "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None, "tokens": int(tokens),
                  "bytes": int(n_bytes), "n_blocks": blocks.n_blocks}
        if start is not None:
            result["kl"] = kl / tokens
        return result

    def references(self, model, evalset) -> dict[str, Any]:
        """``reference_loss`` (...) and ``reference_kl`` of the reference, and ``more_references`` (per source:
        ``loss``, ``kl``) of the other references of ``evalset``. The references are many short documents: their
        boundaries are left out (their prediction is the packing format, which fine-tuning learns, not the text)."""
        reference = self.score(model, evalset.reference, self.eos_id)
        result = {f"reference_{k}": reference[k] for k in _REFERENCE_KEYS}
        if "kl" in reference:
            result["reference_kl"] = reference["kl"]
        more = getattr(evalset, "more", None) or {}
        if more:
            result["more_references"] = {}
            for source, blocks in more.items():
                r = self.score(model, blocks, self.eos_id)
                result["more_references"][source] = {"loss": r["loss"], "kl": r.get("kl")}
        return result


def kl_text(result: dict[str, Any]) -> str:
    return f", KL to the start {result['reference_kl']:.4f}" if result.get("reference_kl") is not None else ""


def _text_problem(name: str, value: str | None) -> list[str]:
    """What is wrong with a text source (a file or folder, or embedded:NAME), if anything."""
    if value and value.startswith(EMBEDDED_PREFIX):
        problem = embedded_name_problem(value)
        return [f"{name}={problem}"] if problem else []
    if value is not None and not value:
        return [f"{name}: give a file, a folder or embedded:NAME"]
    if value and not Path(value).exists():
        return [f"{name}={value!r}: no such file or folder (or embedded:NAME, one of "
                f"{', '.join(EMBEDDED_CORPORA)})"]
    return []


def reference_problems(v: Any) -> list[str]:
    """The texts of forgetting and replay (the corpus and facts tasks)."""
    p = _text_problem("reference_file", v.reference_file) + _text_problem("replay_file", v.replay_file)
    for value in v.more_references:
        p += _text_problem("more_references", value)
    return p
