"""The task and the data of a run's settings: which task, which examples, in which order.

A classification task's examples come from :mod:`cola.llm.data`; the corpus task's blocks from
:mod:`cola.llm.corpus` (documents split by document, packed into blocks of ``max_length``).

The data order of a run depends only on its seed and the epoch (:func:`epoch_batches`), so the
data position of a resumed run is the number of micro-batches it consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cola.errors import ConfigError
from cola.llm import corpus, data, facts, replay
from cola.llm.facts_sources import Fact, FactSet, facts_summary, load_facts, split_phrasings
from cola.llm.objective import EncodedExample, iterate_batches
from cola.llm.replay import ReplayPool
from cola.llm.settings import CORPUS, FACTS, TrainSettings
from cola.llm.tasks import Task, get_task, make_task


def build_task(settings: TrainSettings) -> Task:
    """The task of ``settings``: a built-in one, or ``custom`` from the template and answers."""
    if settings.task == "custom":
        return make_task(settings.template, settings.answers, name="custom",
                         label_field=settings.label_field or "label")
    task = get_task(settings.task)
    if settings.label_field and settings.label_field != task.label_field:
        task = replace(task, label_field=settings.label_field)
    return task


def load_data(settings: TrainSettings, task: Task, seed: int) -> data.Splits:
    """The splits of ``seed``: MeZO's protocol over the task's source or the given files."""
    if settings.train_file:
        train_pool = data.read_rows(Path(settings.train_file))
        data.check_rows(task, train_pool, settings.train_file)
        if settings.test_file:
            test_pool = data.read_rows(Path(settings.test_file))
            data.check_rows(task, test_pool, settings.test_file)
            return data.split_mezo(train_pool, test_pool, settings.n_train, settings.n_val, settings.n_test,
                                   seed, settings.test_seed)
        return data.split_single_pool(train_pool, settings.n_train, settings.n_val, settings.n_test, seed,
                                      settings.test_seed)
    return data.load_splits(task, settings.data_dir, settings.n_train, settings.n_val, settings.n_test, seed,
                            settings.test_seed)


def epoch_batches(encoded: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """The micro-batches of ``epoch``: a permutation drawn from ``(seed, epoch)`` alone."""
    state = int(np.random.SeedSequence([seed, 0x5EED, epoch]).generate_state(1)[0])
    return iterate_batches(encoded, batch_size, torch.Generator().manual_seed(state))


# ============================================================================ forgetting and replay texts

#: the default reference text of forgetting, and the one used when that text is the replay
DEFAULT_REFERENCE = "embedded:tweets"
OTHER_REFERENCE = "embedded:python-docs"


def reference_source(settings: TrainSettings) -> str:
    """The reference text's source: ``reference_file``, else the embedded tweets, else (when the tweets are the
    replay) the Python reference manual: by default never the replay's own source."""
    if settings.reference_file:
        return settings.reference_file
    return OTHER_REFERENCE if settings.replay_file == DEFAULT_REFERENCE else DEFAULT_REFERENCE


@dataclass(frozen=True, eq=False)
class ForgettingTexts:
    """What a corpus or facts run keeps, and what it measures the keeping on: the reference blocks (loss rise and
    KL to the start), the other references (``more_references``), and the replay pool."""

    reference: corpus.Blocks
    more: dict[str, corpus.Blocks]
    replay: ReplayPool | None
    info: dict


def _read(path: str):
    return _cached(("read", path), lambda: corpus.load_corpus(path), path)  # its own files/text defaults


def _tokenizer_id(tokenizer) -> tuple:
    return getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__


def _blocks(tag: str, documents, fingerprint: str, path: str, tokenizer, block: int, n: int | None) -> corpus.Blocks:
    return _cached((tag, fingerprint, _tokenizer_id(tokenizer), block, n),
                   lambda: corpus.prepare_reference(documents, tokenizer, block, n), path)


def forgetting_texts(settings: TrainSettings, tokenizer, block: int, n_blocks: int | None) -> ForgettingTexts:
    """The reference text (``n_blocks`` blocks of ``block`` tokens), the other references and the replay pool of
    ``settings``, the replay never sharing a document with a reference (:func:`cola.llm.replay.separate`)."""
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
        blocks = _blocks("replay", rep_docs, fp, settings.replay_file, tokenizer, block, settings.replay_blocks)
        per_batch = replay.blocks_per_batch(settings.replay_ratio, settings.batch_size)
        replay_info = {"source": rep_text.info.to_dict(), "separation": note, "n_documents": len(rep_docs)}
        pool = replay.ReplayPool(blocks, settings.replay_loss, per_batch, settings.replay_weight, replay_info)
    made = {p: _blocks("reference", docs, fp, p, tokenizer, block, n_blocks) for p, (docs, fp) in documents.items()}
    info = {"reference": ref_text.info.to_dict(), "reference_blocks": {**made[ref_path].summary(), "documents": None},
            "reference_documents": len(documents[ref_path][0])}
    if settings.more_references:
        info["more_references"] = {p: sources[p].info.to_dict() for p in settings.more_references}
    if pool is not None:
        info["replay"] = pool.summary()
    return ForgettingTexts(made[ref_path], {p: made[p] for p in settings.more_references}, pool, info)


# ============================================================================ the corpus task

@dataclass(frozen=True)
class CorpusTask:
    """The corpus task as the plan and the report see it: a name, no answers, where the text came from."""

    info: dict
    name: str = CORPUS
    answers: tuple = ()


@dataclass(frozen=True, eq=False)
class EvalSet:
    """What one evaluation of a corpus run scores: held-out domain blocks, reference blocks, and (the test)
    the other references."""

    domain: corpus.Blocks
    reference: corpus.Blocks
    more: dict[str, corpus.Blocks] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.domain.n_blocks


@dataclass(frozen=True, eq=False)
class CorpusData:
    """A seed's corpus splits, shaped like a classification task's ``Splits``: ``train`` is the list
    of training blocks (the loop's examples), ``validation`` and ``test`` are :class:`EvalSet`."""

    train: list[torch.Tensor]
    validation: EvalSet
    test: EvalSet
    summary: dict

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": self.validation.domain.n_blocks,
                "test": self.test.domain.n_blocks, "reference": self.test.reference.n_blocks}


_CACHE: dict[tuple, object] = {}
_CACHE_SIZE = 8


def _cached(key: tuple, make, path: str | None = "embedded:"):
    """``make()``, kept for the next run of the same process (a sweep, a dry run of many cells): the
    embedded corpora (read) and anything keyed by a corpus's content fingerprint (tokenised). A user's
    file (``path`` not ``embedded:...``) is read again each time: it may have changed."""
    if path is not None and not str(path).startswith(corpus.EMBEDDED_PREFIX):
        return make()
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def load_corpus_data(settings: TrainSettings, tokenizer, seeds: list[int]
                     ) -> tuple[CorpusTask, dict[int, CorpusData], ForgettingTexts]:
    """The documents of ``settings.train_file`` (default: the Python standard library) and the forgetting texts
    (:func:`forgetting_texts`), tokenised once, split by document and packed for each seed."""
    block = settings.max_length
    text = _cached(("read", settings.train_file, settings.files, settings.text_field),
                   lambda: corpus.load_corpus(settings.train_file, settings.files, settings.text_field),
                   settings.train_file)
    kept = forgetting_texts(settings, tokenizer, block, settings.n_test)
    encoded = _cached(("encode", text.info.fingerprint, _tokenizer_id(tokenizer)),
                      lambda: corpus.encode_documents(text.documents, tokenizer))
    reference = kept.reference
    reference_val = reference.evenly(settings.n_val)
    data = {}
    for seed in seeds:
        split = corpus.prepare_corpus(text.documents, tokenizer, block, settings.n_val, settings.n_test, seed=seed,
                                      test_seed=settings.test_seed, encoded=encoded)
        summary = split.summary()
        summary["train"]["documents"] = None  # the held-out documents are named; the rest are training
        data[seed] = CorpusData(list(split.train.input_ids), EvalSet(split.validation, reference_val),
                                EvalSet(split.test, reference, kept.more), summary)
    info = {"corpus": text.info.to_dict(), **kept.info}
    return CorpusTask(info), data, kept


# ============================================================================ the facts task

#: the length of the reference text's blocks that a facts run's forgetting is measured on (and of its replay)
FACTS_REFERENCE_BLOCK = 64


@dataclass(frozen=True)
class FactsTask:
    """The facts task as the plan and the report see it: a name, no answers, the facts' source."""

    info: dict
    name: str = FACTS
    answers: tuple = ()


@dataclass(frozen=True, eq=False)
class FactsEvalSet:
    """What one evaluation of a facts run scores: the facts (and their paraphrases never trained on), reference
    blocks, and (the test) the other references."""

    facts: tuple[Fact, ...]
    encoded: list[EncodedExample]
    paraphrases: list[EncodedExample]
    reference: corpus.Blocks
    more: dict[str, corpus.Blocks] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True, eq=False)
class FactsData:
    """A seed's facts, shaped like a classification task's ``Splits``: ``train`` is every trained phrasing of
    every fact (encoded: the loop's examples), ``validation`` the facts scored after every link, ``test`` all of
    them."""

    train: list[EncodedExample]
    validation: FactsEvalSet
    test: FactsEvalSet
    summary: dict

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test),
                "paraphrases": len(self.test.paraphrases), "reference": self.test.reference.n_blocks}


def _facts_taught(settings: TrainSettings) -> FactSet:
    """The facts of ``settings.train_file`` (``n_train`` of them, drawn by ``test_seed``, when it is set)."""
    found = _cached(("facts", settings.train_file, settings.test_seed, settings.prompt_field, settings.answer_field,
                     settings.paraphrases_field),
                    lambda: load_facts(settings.train_file, settings.test_seed, settings.prompt_field,
                                       settings.answer_field, settings.paraphrases_field),
                    None if str(settings.train_file).startswith("synthetic:") else settings.train_file)
    if settings.n_train is None or settings.n_train >= len(found):
        return found
    pick = sorted(np.random.default_rng([settings.test_seed, 3]).permutation(len(found))[:settings.n_train])
    chosen = tuple(found.facts[i] for i in pick)
    return FactSet(chosen, {**found.info, "n_facts": len(chosen), "n_of": len(found)})


def load_facts_data(settings: TrainSettings, tokenizer, seeds: list[int], max_length: int | None
                    ) -> tuple[FactsTask, dict[int, FactsData], ForgettingTexts]:
    """The facts taught, encoded once, and the forgetting texts (:func:`forgetting_texts`) in blocks.

    Every seed is taught the same facts (their order is the seed's): each fact's prompt and, with
    ``train_paraphrases`` K, K more of its phrasings (:func:`cola.llm.facts_sources.split_phrasings`). The
    validation facts are ``n_val`` of them, evenly spaced (all by default), with their held-out paraphrases only
    when some are trained on (so that tuning can read their recall); the test facts all of them with every
    paraphrase never trained on. Recall is scored on the facts' own prompts.
    """
    taught = _facts_taught(settings)
    k = settings.train_paraphrases
    split = [split_phrasings(f, k) for f in taught.facts]
    if k and not any(held for _, held in split):
        raise ConfigError(f"train_paraphrases={k}: no fact keeps a paraphrase that is never trained on (the most "
                          f"phrasings a fact has is {max(len(f.phrasings) + len(f.paraphrases) for f in taught.facts)}"
                          "); train on fewer")
    prompts = facts.encode_facts(tokenizer, taught.facts, max_length)
    extra = facts.encode_phrasings(tokenizer, taught.facts, [trained for trained, _ in split], max_length)
    train = prompts + extra
    held = [held for _, held in split]
    paraphrases = facts.encode_phrasings(tokenizer, taught.facts, held, max_length)
    kept = forgetting_texts(settings, tokenizer, FACTS_REFERENCE_BLOCK, settings.n_test)
    reference = kept.reference
    test = FactsEvalSet(taught.facts, prompts, paraphrases, reference, kept.more)
    # after every link: the facts (all, or n_val evenly spaced) and the reference; paraphrases at the end only,
    # unless some are trained on
    keep = corpus.evenly_spaced(len(prompts), len(prompts) if settings.n_val is None else settings.n_val).tolist()
    val_paraphrases = facts.encode_phrasings(tokenizer, [taught.facts[i] for i in keep], [held[i] for i in keep],
                                             max_length) if k else []
    validation = FactsEvalSet(tuple(taught.facts[i] for i in keep), [prompts[i] for i in keep], val_paraphrases,
                              reference if settings.n_val is None else reference.evenly(settings.n_val))
    summary = {"facts": facts_summary(taught), "validation_facts": len(validation),
               "trained_phrasings": len(train), "held_out_paraphrases": len(paraphrases),
               "reference": {**reference.summary(), "documents": None}}
    info = {"facts": summary["facts"], "train_paraphrases": k, **kept.info}
    return FactsTask(info), {seed: FactsData(train, validation, test, summary) for seed in seeds}, kept
