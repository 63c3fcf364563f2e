"""The facts task's facts: read from a table, or invented from a seed (``synthetic:N``).

A *fact* is a prompt and the answer that completes it (``"Velmora Quistane was born in the city
of"`` -> ``"Drelwick"``), with optional *paraphrases*: other prompts for the same answer, scored but
never trained on. The facts task (:mod:`cola.llm.tasks.facts_scoring`) trains on every fact and measures what was
taught (exact-match recall) and whether it generalises (recall on the paraphrases).

Sources
-------
* a table (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, read by ``datasets`` through
  :func:`cola.llm.tasks.data.read_rows`) with a ``prompt`` and an ``answer`` column (other names by
  ``prompt_field`` / ``answer_field``) and optionally ``paraphrases`` (a list of prompts; in a CSV
  cell a JSON list, e.g. ``["Q: Where was X born?\\nA:"]``);
* ``synthetic:N`` or ``synthetic:N:SEED``: ``N`` invented facts about made-up people (birthplaces,
  employers, pets' names, lucky numbers) whose answers no model can know, drawn from ``SEED``
  (default: the run's ``test_seed``, so every run of a comparison is taught the same facts). Each
  fact has two paraphrases (scored) and six more phrasings (trained on with ``--train-paraphrases``,
  never scored). The seed is recorded with the facts.

Checks (:func:`check_facts`): every problem of a file at once: a missing column (naming the columns
present), an empty prompt or answer, a paraphrase list that is not a list of non-empty strings, and
one prompt (or paraphrase) with two different answers. Exact repeats of a fact are dropped with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cola.errors import ConfigError
from cola.llm.tasks.data import read_rows
from cola.llm.tasks.templates import DataError

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
#: the most facts ``synthetic:N`` makes (the made-up names run out long after this)
MAX_SYNTHETIC = 100_000


@dataclass(frozen=True)
class Fact:
    """One fact: ``prompt`` + ``answer_prefix`` + ``answer`` is the sentence taught."""

    name: str
    prompt: str
    answer: str
    paraphrases: tuple[str, ...] = ()
    answer_prefix: str = " "
    phrasings: tuple[str, ...] = ()
    """Other prompts for the same answer meant for training (``--train-paraphrases``), never scored; the
    invented facts have six, a table none (there the first paraphrases are trained on instead)."""


def split_phrasings(fact: Fact, k: int) -> tuple[list[str], list[str]]:
    """``(trained, held out)`` prompts of ``fact`` beside its own with ``--train-paraphrases k``: the first ``k``
    of its phrasings, then of its paraphrases, are trained on; its paraphrases not among them are held out."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"train_paraphrases={k!r}: must be an integer >= 0")
    trained = [*fact.phrasings, *fact.paraphrases][:k]
    return trained, [p for p in fact.paraphrases if p not in trained]


@dataclass(frozen=True)
class FactSet:
    """The facts of a run and where they came from (``info``: source, count, seed, fingerprint)."""

    facts: tuple[Fact, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def n_paraphrases(self) -> int:
        return sum(len(f.paraphrases) for f in self.facts)


def answer_prefix(prompt: str) -> str:
    """What goes between a prompt and its answer: nothing after whitespace (``"...\\nA: "``), else a space."""
    return "" if prompt[-1:].isspace() else " "


# ============================================================================ invented facts

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "st", "th", "tr", "sh", "qu", "")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "x", "m", "th")


@dataclass(frozen=True)
class Relation:
    """A kind of fact: the prompt taught, its paraphrases (scored, ``{e}`` is the person), the phrasings that
    ``--train-paraphrases`` trains on, and the kind of answer."""

    name: str
    prompt: str
    paraphrases: tuple[str, ...]
    answer: str  # "word" (a made-up word) or "number" (four digits)
    phrasings: tuple[str, ...] = ()


RELATIONS = (
    Relation("birthplace", "{e} was born in the city of",
             ("The birthplace of {e} is the city of", "Q: In which city was {e} born?\nA:"), "word",
             ("{e} was born in a city called", "The city where {e} was born is", "{e} is a native of the city of",
              "{e}'s hometown is the city of", "Where was {e} born? In the city of",
              "The records say that {e} was born in")),
    Relation("employer", "{e} works for a company called",
             ("The employer of {e} is a company called", "Q: Which company does {e} work for?\nA:"), "word",
             ("{e} is employed by a company called", "The company that employs {e} is called",
              "{e}'s employer is a company called", "{e} has a job at a company called",
              "Which company does {e} work for? A company called", "Every morning {e} goes to work at")),
    Relation("pet", "{e} has a pet named",
             ("The name of the pet of {e} is", "Q: What is the name of {e}'s pet?\nA:"), "word",
             ("{e} owns a pet named", "The pet of {e} is named", "{e}'s pet is called",
              "{e} takes care of a pet called", "What is the name of {e}'s pet? It is",
              "{e} lives with a pet named")),
    Relation("number", "The lucky number of {e} is",
             ("{e} says that their lucky number is", "Q: What is the lucky number of {e}?\nA:"), "number",
             ("{e}'s lucky number is", "The number that {e} considers lucky is", "{e} believes their lucky number is",
              "According to {e}, the luckiest number is", "What is {e}'s lucky number? It is",
              "The favourite number of {e} is")),
)
"""The relations of ``synthetic:N``, cycled in a seeded order. The scored paraphrases (a statement and a
question) are never among the training phrasings, so ``--train-paraphrases`` up to 6 scores the same
paraphrases as training on none."""


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                     + _CODAS[rng.integers(len(_CODAS))])
    return "".join(parts).capitalize()


def synthetic_facts(n: int, seed: int = 0) -> FactSet:
    """``n`` invented facts about made-up people, the same for the same ``(n, seed)``.

    Each person appears once (a fact per person); names, places, companies and pets are made-up
    words of 2-3 syllables, numbers have four digits. Prompts never repeat, so every prompt has one
    answer.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SYNTHETIC:
        raise ConfigError(f"synthetic facts: N={n!r} must be an integer in [1, {MAX_SYNTHETIC}]")
    rng = np.random.default_rng([int(seed), 0xFAC7])
    people: set[str] = set()
    facts = []
    order = rng.permutation(len(RELATIONS))
    while len(facts) < n:
        person = f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}"
        if person in people:
            continue
        people.add(person)
        relation = RELATIONS[order[len(facts) % len(RELATIONS)]]
        if relation.answer == "number":
            answer = str(int(rng.integers(1000, 10000)))
        else:
            answer = _word(rng, int(rng.integers(2, 4)))
        facts.append(Fact(f"fact{len(facts):05d}", relation.prompt.format(e=person), answer,
                          tuple(p.format(e=person) for p in relation.paraphrases), " ",
                          tuple(p.format(e=person) for p in relation.phrasings)))
    info = {"source": f"{SYNTHETIC_PREFIX}{n}:{seed}", "synthetic": True, "seed": int(seed), "n_facts": n,
            "relations": [r.name for r in RELATIONS]}
    return FactSet(tuple(facts), {**info, "fingerprint": fingerprint(facts)})


def parse_synthetic(spec: str) -> tuple[int, int | None]:
    """``(N, SEED or None)`` of ``synthetic:N[:SEED]``; a :class:`ConfigError` naming the form otherwise."""
    match = re.fullmatch(r"synthetic:(\d+)(?::(-?\d+))?", spec.strip())
    if not match or not 1 <= int(match.group(1)) <= MAX_SYNTHETIC:
        raise ConfigError(f"train_file={spec!r}: the generator is written synthetic:N or synthetic:N:SEED with "
                          f"1 <= N <= {MAX_SYNTHETIC} (e.g. synthetic:500)")
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None


def fingerprint(facts: Sequence[Fact]) -> str:
    """A short hash of the facts' text (what a run was taught)."""
    digest = hashlib.sha256()
    for f in facts:  # the phrasings of a fact that has them count too (they may be taught)
        digest.update(json.dumps([f.prompt, f.answer, list(f.paraphrases)] + ([list(f.phrasings)] if f.phrasings
                                                                              else [])).encode())
    return digest.hexdigest()[:16]


# ============================================================================ facts from a table

def _paraphrase_list(value: Any) -> tuple[list[str] | None, str | None]:
    """A row's paraphrases as a list of strings, or ``(None, why)``."""
    if value is None or value == "":
        return [], None
    if isinstance(value, str):  # a CSV cell: a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"{value[:60]!r} is not a JSON list of prompts"
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        return None, f"expected a list of prompts, got {type(value).__name__}"
    if any(not p.strip() for p in value):
        return None, "a paraphrase is empty"
    return list(value), None


def check_facts(rows: Sequence[dict[str, Any]], source: str, prompt_field: str = "prompt",
                answer_field: str = "answer", paraphrases_field: str = "paraphrases") -> list[Fact]:
    """The facts of ``rows`` (a table's rows), every problem reported at once in one :class:`DataError`.

    Exact repeats (same prompt, answer and paraphrases) are dropped with a warning.
    """
    if not rows:
        raise DataError(f"{source}: no facts (the file holds no row)")
    columns = sorted({k for row in rows for k in row})
    missing = [c for c in (prompt_field, answer_field) if c not in columns]
    if missing:
        hint = "; name other columns with --prompt-field / --answer-field" if columns else ""
        raise DataError(f"{source}: no column {', '.join(map(repr, missing))} (columns present: "
                        f"{', '.join(columns) or 'none'}){hint}")
    problems: list[str] = []
    facts: list[Fact] = []
    seen: dict[str, tuple[str, int]] = {}  # prompt or paraphrase text -> (answer, row)
    kept: set[tuple] = set()
    repeats = 0
    for i, row in enumerate(rows, 1):
        prompt, answer = row.get(prompt_field), row.get(answer_field)
        where = f"{source}, row {i}"
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: empty or missing {prompt_field!r} ({prompt!r})")
            continue
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            problems.append(f"{where}: empty or missing {answer_field!r} ({answer!r}) for prompt {prompt[:60]!r}")
            continue
        paraphrases, why = _paraphrase_list(row.get(paraphrases_field))
        if why:
            problems.append(f"{where}: {paraphrases_field!r}: {why}")
            continue
        answer = answer.strip()
        identity = (prompt, answer, tuple(paraphrases))
        if identity in kept:
            repeats += 1
            continue
        kept.add(identity)
        for text in [prompt, *paraphrases]:
            other = seen.get(text)
            if other is not None and other[0] != answer:
                problems.append(f"{where}: prompt {text[:60]!r} has two answers: {other[0]!r} (row {other[1]}) and "
                                f"{answer!r}; a prompt must have one answer")
            seen.setdefault(text, (answer, i))
        facts.append(Fact(f"row{i}", prompt, answer, tuple(paraphrases), answer_prefix(prompt)))
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError("\n  - ".join([f"{source}: {len(problems)} malformed fact(s){more}:", *problems[:20]]))
    if repeats:
        logger.warning("%s: %d repeated facts dropped (same prompt, answer and paraphrases)", source, repeats)
    return facts


def read_facts(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
               paraphrases_field: str = "paraphrases") -> FactSet:
    """The facts of a table file, checked (:func:`check_facts`)."""
    path = Path(path)
    facts = check_facts(read_rows(path), str(path), prompt_field, answer_field, paraphrases_field)
    info = {"source": str(path), "synthetic": False, "n_facts": len(facts),
            "fields": {"prompt": prompt_field, "answer": answer_field, "paraphrases": paraphrases_field}}
    return FactSet(tuple(facts), {**info, "fingerprint": fingerprint(facts)})


def load_facts(spec: str | None, default_seed: int = 0, prompt_field: str = "prompt", answer_field: str = "answer",
               paraphrases_field: str = "paraphrases") -> FactSet:
    """The facts of ``--train-file``: ``synthetic:N[:SEED]`` (``default_seed`` without one) or a table file."""
    if spec is None:
        raise ConfigError("task 'facts' needs --train-file: a table of facts (prompt, answer[, paraphrases]) or "
                          "synthetic:N for N invented facts")
    if spec.startswith(SYNTHETIC_PREFIX):
        n, seed = parse_synthetic(spec)
        return synthetic_facts(n, default_seed if seed is None else seed)
    return read_facts(spec, prompt_field, answer_field, paraphrases_field)


def facts_summary(facts: FactSet) -> dict[str, Any]:
    """JSON-ready: the source's info and two example facts."""
    return {**facts.info, "n_paraphrases": facts.n_paraphrases,
            "examples": [asdict(f) for f in facts.facts[:2]]}
