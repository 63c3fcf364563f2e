"""The task and the data of a run's settings: which task, which examples, in which order.

A classification task's examples come from :mod:`cola.llm.data`; the corpus task's blocks from
:mod:`cola.llm.corpus` (documents split by document, packed into blocks of ``max_length``).

The data order of a run depends only on its seed and the epoch (:func:`epoch_batches`), so the
data position of a resumed run is the number of micro-batches it consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cola.llm import corpus, data, facts
from cola.llm.facts_sources import Fact, FactSet, facts_summary, load_facts
from cola.llm.objective import EncodedExample, iterate_batches
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


# ============================================================================ the corpus task

@dataclass(frozen=True)
class CorpusTask:
    """The corpus task as the plan and the report see it: a name, no answers, where the text came from."""

    info: dict
    name: str = CORPUS
    answers: tuple = ()


@dataclass(frozen=True, eq=False)
class EvalSet:
    """What one evaluation of a corpus run scores: held-out domain blocks and reference blocks."""

    domain: corpus.Blocks
    reference: corpus.Blocks

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


def load_corpus_data(settings: TrainSettings, tokenizer, seeds: list[int]) -> tuple[CorpusTask, dict[int, CorpusData]]:
    """The documents of ``settings.train_file`` (default: the Python standard library) and the reference
    text (default: the embedded tweets), tokenised once, split by document and packed for each seed."""
    block = settings.max_length
    text = _cached(("read", settings.train_file, settings.files, settings.text_field),
                   lambda: corpus.load_corpus(settings.train_file, settings.files, settings.text_field),
                   settings.train_file)
    reference_text = _cached(("read", settings.reference_file), lambda: corpus.load_corpus(
        settings.reference_file or "embedded:tweets"), settings.reference_file)  # its own files/text defaults
    tokenizer_id = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__)
    encoded = _cached(("encode", text.info.fingerprint, tokenizer_id),
                      lambda: corpus.encode_documents(text.documents, tokenizer))
    reference = _cached(("reference", reference_text.info.fingerprint, tokenizer_id, block, settings.n_test),
                        lambda: corpus.prepare_reference(reference_text.documents, tokenizer, block, settings.n_test))
    reference_val = reference.evenly(settings.n_val)
    data = {}
    for seed in seeds:
        split = corpus.prepare_corpus(text.documents, tokenizer, block, settings.n_val, settings.n_test, seed=seed,
                                      test_seed=settings.test_seed, encoded=encoded)
        summary = split.summary()
        summary["train"]["documents"] = None  # the held-out documents are named; the rest are training
        data[seed] = CorpusData(list(split.train.input_ids), EvalSet(split.validation, reference_val),
                                EvalSet(split.test, reference), summary)
    info = {"corpus": text.info.to_dict(), "reference": reference_text.info.to_dict(),
            "reference_blocks": {**reference.summary(), "documents": None}}
    return CorpusTask(info), data


# ============================================================================ the facts task

#: the length of the reference text's blocks that a facts run's forgetting is measured on
FACTS_REFERENCE_BLOCK = 64


@dataclass(frozen=True)
class FactsTask:
    """The facts task as the plan and the report see it: a name, no answers, the facts' source."""

    info: dict
    name: str = FACTS
    answers: tuple = ()


@dataclass(frozen=True, eq=False)
class FactsEvalSet:
    """What one evaluation of a facts run scores: the facts (and their paraphrases), and reference blocks."""

    facts: tuple[Fact, ...]
    encoded: list[EncodedExample]
    paraphrases: list[EncodedExample]
    reference: corpus.Blocks

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True, eq=False)
class FactsData:
    """A seed's facts, shaped like a classification task's ``Splits``: ``train`` is every fact (encoded:
    the loop's examples), ``validation`` the facts scored after every link, ``test`` all of them."""

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


def load_facts_data(settings: TrainSettings, tokenizer, seeds: list[int],
                    max_length: int | None) -> tuple[FactsTask, dict[int, FactsData]]:
    """The facts taught, encoded once, and the reference text (default: the embedded tweets) in blocks.

    Every seed is taught the same facts (their order is the seed's); the validation facts are
    ``n_val`` of them, evenly spaced (all by default), without their paraphrases; the test facts all of
    them with their paraphrases.
    """
    taught = _facts_taught(settings)
    train = facts.encode_facts(tokenizer, taught.facts, max_length)
    paraphrases = facts.encode_paraphrases(tokenizer, taught.facts, max_length)
    reference_text = _cached(("read", settings.reference_file), lambda: corpus.load_corpus(
        settings.reference_file or "embedded:tweets"), settings.reference_file)
    tokenizer_id = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__)
    reference = _cached(("reference", reference_text.info.fingerprint, tokenizer_id, FACTS_REFERENCE_BLOCK,
                         settings.n_test),
                        lambda: corpus.prepare_reference(reference_text.documents, tokenizer, FACTS_REFERENCE_BLOCK,
                                                         settings.n_test))
    test = FactsEvalSet(taught.facts, train, paraphrases, reference)
    # after every link: the facts (all, or n_val evenly spaced) and the reference; paraphrases at the end only
    keep = corpus.evenly_spaced(len(train), len(train) if settings.n_val is None else settings.n_val).tolist()
    validation = FactsEvalSet(tuple(taught.facts[i] for i in keep), [train[i] for i in keep], [],
                              reference if settings.n_val is None else reference.evenly(settings.n_val))
    summary = {"facts": facts_summary(taught), "validation_facts": len(validation),
               "reference": {**reference.summary(), "documents": None}}
    info = {"facts": summary["facts"], "reference": reference_text.info.to_dict()}
    return FactsTask(info), {seed: FactsData(train, validation, test, summary) for seed in seeds}
