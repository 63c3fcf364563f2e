"""Every measured figure in the tables of README.md and docs/*.md comes from a committed results file.

A table that holds measured numbers names its source on a line just before it (blank lines and
other comments may come between)::

    <!-- source: benchmarks/results/speed.json, benchmarks/results/knot.json; scale: 1e-9 -->

Paths are relative to the repository root; ``scale`` (optional) lists factors that the source's
numbers are also multiplied by (``1e3`` for seconds shown as ms, ``2^-30`` for bytes shown as GiB,
``1e-9`` for FLOP/s shown as GFLOP/s), ``columns`` (optional, default ``2-``: all but the first,
which names the row) the columns that report figures (``2``, ``3-8``; a column of targets or
verdicts is left out). Every number in the other columns (outside inline code)
must be found in the source: the source is flattened to its numbers (JSON leaves, CSV cells,
numbers in text), and a doc number matches when some source number (or its scaled form, or for
``12.3%`` its percentage) rounds to it at the doc's printed precision (``0.83`` matches 0.8251 to
0.8349; ``78,897`` and ``9.8e-6`` are read as numbers). Each unmatched number is reported with its
page, line and the closest source numbers. A number that cannot be matched is fixed in the doc to
what the file says, or removed: a results file is never edited by hand to match a doc.

Tables without measured numbers need no source: a table with no number outside its label columns
passes as it is; a table of settings or options says so with ``<!-- not-measured: reason -->``;
the tables that ``tests/test_docs.py`` already checks against the code are listed in ``EXEMPT``
with the reason (a stale entry fails).

Figures in prose are sourced by the sentence that quotes them (the file is named beside the
figure); the few that are counts or timings computed from a committed file (the theory run's
check count and time, the compare run's time, the sweeps' summed run times) are in ``PROSE`` and
checked against the file.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_docs import PAGES, ROOT, outside_fences

#: tables checked elsewhere, by (page, header row as written), with the reason
EXEMPT = {
    ("README.md", "| field | default | meaning |"):
        "ChainConfig's defaults: checked against the dataclass by tests/test_docs.py",
    ("README.md", "| kind | name | what it does | options |"):
        "the built-in strategies and their option names: checked against `cola plugins` by tests/test_docs.py",
}



def in_progress(root: Path, name: str) -> bool:
    """Whether ``name`` lies in a sweep folder (``docs/sweeps/<sweep>/...``) whose ``results.json`` does not
    say ``complete``: a sweep still being written (or never finished) is no source a figure may quote."""
    parts = Path(name).parts
    if len(parts) < 3 or parts[:2] != ("docs", "sweeps"):
        return False
    results = root / "docs" / "sweeps" / parts[2] / "results.json"
    try:
        return json.loads(results.read_text()).get("status") != "complete"
    except (OSError, ValueError):
        return True

MARKER = re.compile(r"^\s*<!--\s*(source|not-measured):\s*(.*?)\s*-->\s*$")
MINUS = "\u2212"
#: a printed number: optional sign, digits (thousands separated by commas), decimals, exponent, %
NUMBER = re.compile(r"[+\-\u2212]?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:e[+\-\u2212]?\d+)?%?")


# ============================================================================ reading tables

@dataclass
class Table:
    page: Path
    line: int                       # 1-based line of the header row
    header: str
    rows: list[tuple[int, list[str]]]
    marker: tuple[str, str] | None  # ("source" | "not-measured", its text)
    options: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(self.root)}:{self.line}"


def cells(row: str) -> list[str]:
    """The cells of a table row (``|`` inside inline code does not split)."""
    parts, current, code = [], "", False
    for ch in row.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def tables(page: Path, root: Path = ROOT) -> list[Table]:
    """The pipe tables of ``page`` outside code blocks, each with the marker comment just before it."""
    lines = outside_fences(page.read_text())
    delimiter = re.compile(r"^\s*\|[\s:|-]*-[\s:|-]*$")
    found, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and delimiter.match(lines[i + 1]):
            start, j = i, i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            marker, k = None, start - 1
            while k >= 0 and (not lines[k].strip() or lines[k].lstrip().startswith("<!--")):
                m = MARKER.match(lines[k])
                if m and marker is None:
                    marker = (m.group(1), m.group(2))
                k -= 1
            rows = [(n + 1, cells(lines[n])) for n in range(start + 2, j)]
            table = Table(page, start + 1, lines[start].strip(), rows, marker, root=root)
            if marker and marker[0] == "source":
                paths, *opts = marker[1].split(";")
                table.options = {"paths": paths.strip()}
                for opt in opts:
                    key, _, value = opt.partition(":")
                    table.options[key.strip()] = value.strip()
            found.append(table)
            i = j
        else:
            i += 1
    return found


def _plain(cell: str) -> str:
    """A cell as read: inline code dropped, links reduced to their text, emphasis marks dropped."""
    cell = re.sub(r"(`+)(?!`).+?(?<!`)\1(?!`)", " ", cell)
    cell = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", cell)
    return cell.replace("**", "").replace("__", "")


@dataclass
class Figure:
    text: str
    value: float
    tolerance: float   # half a unit of the last printed digit
    percent: bool


def figures(cell: str) -> list[Figure]:
    """The printed numbers of a cell; a number glued to a word (``OPT-125m``, ``r=2``, ``8/8/8``,
    ``5e-3`` in a label) names something and is not a figure."""
    text = _plain(cell)
    found = []
    for m in NUMBER.finditer(text):
        token, start, end = m.group(0), m.start(), m.end()
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if token[0] in "+-" + MINUS and before.isalnum():
            continue                        # a hyphen inside a name: OPT-125m, Llama-2-7B
        if before.isalnum() or before in "_=/.^" or after.isalnum() or after in "_/" \
                or (after == "." and end + 1 < len(text) and text[end + 1].isdigit()):
            continue
        percent = token.endswith("%")
        body = token.rstrip("%").replace(MINUS, "-").replace(",", "")
        mantissa, _, exponent = body.partition("e")
        decimals = len(mantissa.partition(".")[2])
        tolerance = 0.5 * 10 ** (-decimals + (int(exponent) if exponent else 0))
        found.append(Figure(token, float(body), tolerance, percent))
    return found


# ============================================================================ reading sources

def _numbers_in_text(text: str) -> list[float]:
    return [float(m.replace(MINUS, "-").replace(",", "")) for m in
            re.findall(r"[+\-\u2212]?\d+(?:\.\d+)?(?:[eE][+\-]?\d+)?", text)]


def source_numbers(path: Path) -> list[float]:
    """Every number in a results file: JSON leaves (and numbers inside its strings), CSV cells,
    the numbers of any other text (logs, markdown)."""
    text = path.read_text()
    if path.suffix == ".json":
        out: list[float] = []

        def walk(x):
            if isinstance(x, bool) or x is None:
                return
            if isinstance(x, (int, float)):
                if math.isfinite(x):
                    out.append(float(x))
            elif isinstance(x, str):
                out.extend(_numbers_in_text(x))
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            else:
                for v in x:
                    walk(v)

        walk(json.loads(text))
        return out
    if path.suffix == ".csv":
        return [n for row in csv.reader(io.StringIO(text)) for c in row for n in _numbers_in_text(c)]
    return _numbers_in_text(text)


def _scales(text: str) -> list[float]:
    scales = [1.0]
    for item in filter(None, (s.strip() for s in text.split(","))):
        base, _, power = item.partition("^")
        scales.append(float(base) ** float(power) if power else float(base))
    return scales


def _columns(text: str):
    """``"2-"``, ``"2,4"``, ``"3-8"``: which (1-based) columns hold figures, as a predicate."""
    spans = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        first, dash, last = item.partition("-")
        spans.append((int(first), int(last) if last else (10 ** 6 if dash else int(first))))
    return lambda n: any(a <= n <= b for a, b in spans)


def table_problems(table: Table, root: Path = ROOT) -> list[str]:
    """What is wrong with a table's figures (empty when nothing is)."""
    rel = str(table.page.relative_to(root))
    checked = _columns(table.options.get("columns", "2-")) if table.marker else _columns("2-")
    shown = [(line, f) for line, row in table.rows for n, cell in enumerate(row, 1) if checked(n)
             for f in figures(cell)]
    if table.marker is None:
        if (rel, table.header) in EXEMPT or not shown:
            return []
        return [f"{table.where}: a table of numbers ({', '.join(f.text for _, f in shown[:4])}, ...) with no "
                f"`<!-- source: FILE -->` or `<!-- not-measured: reason -->` comment before it"]
    kind, text = table.marker
    if kind == "not-measured":
        return [] if text else [f"{table.where}: `not-measured` needs a reason"]
    unknown = set(table.options) - {"paths", "scale", "columns"}
    problems = [f"{table.where}: unknown option(s) {', '.join(sorted(unknown))} (known: scale, columns)"] \
        if unknown else []
    numbers: list[float] = []
    for name in filter(None, (p.strip() for p in table.options["paths"].split(","))):
        path = root / name
        if in_progress(root, name):
            problems.append(f"{table.where}: source {name} is a sweep still being written")
        elif not path.is_file():
            problems.append(f"{table.where}: source {name} does not exist")
        else:
            numbers += source_numbers(path)
    if problems:
        return problems
    candidates = sorted({n * s for n in numbers for s in _scales(table.options.get("scale", ""))})
    for line, fig in shown:
        wanted = [(fig.value, fig.tolerance)] + ([(fig.value / 100, fig.tolerance / 100)] if fig.percent else [])
        if any(abs(c - w) <= tol * (1 + 1e-9) + 1e-12 for w, tol in wanted for c in _near(candidates, w)):
            continue
        shown_as = [c * 100 for c in candidates] if fig.percent else candidates
        closest = sorted(shown_as, key=lambda c: abs(c - fig.value))[:3]
        problems.append(f"{rel}:{line}: {fig.text} is in no source ({table.options['paths']}); "
                        f"closest: {', '.join(f'{c:.6g}' + '%' * fig.percent for c in closest)}")
    return problems


def _near(candidates: list[float], value: float) -> list[float]:
    """The two sorted candidates around ``value`` (the only ones that can round to it)."""
    i = bisect.bisect_left(candidates, value)
    return candidates[max(0, i - 1):i + 1]


# ============================================================================ the checks

TABLES = [t for page in PAGES for t in tables(page)]


def test_tables_are_found():
    """The reader sees the docs' tables and their markers (a broken reader would make the check vacuous)."""
    assert len(TABLES) >= 15, [t.where for t in TABLES]
    sourced = [t for t in TABLES if t.marker and t.marker[0] == "source"]
    assert len(sourced) >= 8, [t.where for t in sourced]
    assert sum(len(figures(c)) for t in sourced for _, row in t.rows for c in row) >= 300


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.where)
def test_table_figures_come_from_their_source(table):
    """Each table of measured numbers names its source, and each of its numbers is in it."""
    problems = table_problems(table)
    assert not problems, "\n".join(problems)


def _sweep_minutes(name: str) -> float:
    """The sum of the runs' ``wall_seconds`` of a committed sweep, in minutes (each run once)."""
    results = json.loads((ROOT / "docs" / "sweeps" / name / "results.json").read_text())
    runs = {c["key"]: c["compute"]["wall_seconds"]["values"] for c in results["cells"]}
    return sum(map(sum, runs.values())) / 60


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


#: figures in prose, each with the page, the sentence pattern and what the committed file says
PROSE = [
    ("docs/theory.md", r"seed 0: (\d+) checks, (\d+) passed, ([\d.]+) s",
     lambda: (lambda d: (str(len(d["checks"])), str(sum(c["passed"] for c in d["checks"])),
                         f"{d['wall_seconds']:.1f}"))(_json("docs/theory-results/theory.json"))),
    ("docs/training.md", r"(\d+) s for the whole command",
     lambda: (f"{_json('docs/compare-cpu/results.json')['seconds']:.0f}",)),
    ("docs/sweeps.md", r"add up to (\d+) minutes", lambda: (f"{_sweep_minutes('chain-length-x-lr'):.0f}",)),
    ("docs/sweeps.md", r"12 runs, (\d+)\s+minutes by the same count",
     lambda: (f"{_sweep_minutes('rank-step-down-cpu'):.0f}",)),
    ("docs/sweeps.md", r"add up to (\d+) h (\d+) min",
     lambda: tuple(str(x) for x in divmod(round(_sweep_minutes("capacity-cpu")), 60))),
    ("docs/sweeps.md", r"The 9 report runs' `wall_seconds` in `results.json` add up to (\d+) minutes",
     lambda: (f"{_sweep_minutes('capacity-tuned-cpu'):.0f}",)),
]


@pytest.mark.parametrize("page,pattern,expected", PROSE, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(PROSE)])
def test_prose_figures_match_their_files(page, pattern, expected):
    """The few figures quoted in prose (counts, timings) are what the committed file says."""
    text = " ".join((ROOT / page).read_text().split())
    m = re.search(pattern, text)
    assert m, f"{page}: no sentence matches {pattern!r} (update PROSE with the page)"
    assert m.groups() == expected(), f"{page}: {m.group(0)!r}, but the file says {expected()}"


def test_exemptions_are_current():
    """Every exempted table still exists (an entry for a table that is gone or renamed fails)."""
    present = {(str(t.page.relative_to(ROOT)), t.header) for t in TABLES}
    stale = [key for key in EXEMPT if key not in present]
    assert not stale, f"EXEMPT names tables that no longer exist: {stale}"


def test_figures_reader():
    """Numbers are read as printed; names, settings and code are not figures."""
    got = [(f.text, f.value, f.tolerance, f.percent) for f in figures(
        "OPT-125m 3.24 (84.5% of GEMM) 78,897 −0.71 [−0.90, +0.52] 9.8e-6 r=2 8/8/8 `x=1.5` 1.29× 103.1–113.0 "
        "[a 2](x.md)")]
    assert got == [("3.24", 3.24, 0.005, False), ("84.5%", 84.5, 0.05, True), ("78,897", 78897.0, 0.5, False),
                   ("−0.71", -0.71, 0.005, False), ("−0.90", -0.9, 0.005, False), ("+0.52", 0.52, 0.005, False),
                   ("9.8e-6", 9.8e-6, 0.5e-7, False), ("1.29", 1.29, 0.005, False),
                   ("103.1", 103.1, 0.05, False), ("113.0", 113.0, 0.05, False), ("2", 2.0, 0.5, False)]


def test_the_checker_finds_unsourced_and_wrong_figures(tmp_path):
    """The check can fail: a number no source holds (reported with the closest), a table with no
    source, a missing file, a sweep in progress; scales, percentages and rounding are accepted."""
    (tmp_path / "r.json").write_text(json.dumps({"a": 3.2449, "gemm_fraction": 0.8449, "bytes": 17352631808,
                                                 "s": 0.1038, "tokens": 78896.79, "note": "took 57.2 ms"}))
    (tmp_path / "r.csv").write_text("x,y\n0.5,-0.7149\n")
    (tmp_path / "docs" / "sweeps" / "running").mkdir(parents=True)
    (tmp_path / "docs" / "sweeps" / "running" / "x.json").write_text("[1]")
    (tmp_path / "docs" / "sweeps" / "running" / "results.json").write_text('{"status": "partial"}')
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- source: r.json, r.csv; scale: 1e3, 2^-30 -->\n\n"
        "| what | value |\n|---|---|\n"
        "| ok | 3.24 (84.5%), 16.2 GiB, 103.8 ms, 78,897, 57.2, −0.71, 0.5 |\n"
        "| wrong | 3.26 and 85% |\n\n"
        "| no source | 1.5 |\n|---|---|\n| a | 2.5 |\n\n"
        "| only labels | text |\n|---|---|\n| 7 | none |\n\n"
        "<!-- not-measured: settings -->\n| setting | value |\n|---|---|\n| links | 3 |\n\n"
        "<!-- source: r.json; columns: 2 -->\n| what | measured | target |\n|---|---|---|\n| a | 3.24 | ≤ 1.01 |\n\n"
        "<!-- source: missing.json -->\n| x | y |\n|---|---|\n| a | 1 |\n\n"
        "<!-- source: docs/sweeps/running/x.json -->\n| x | y |\n|---|---|\n| a | 1 |\n\n"
        "<!-- source: r.json; scales: 1e3 -->\n| x | y |\n|---|---|\n| a | 3.24 |\n")
    found = tables(page, root=tmp_path)
    assert [t.marker and t.marker[0] for t in found] == ["source", None, None, "not-measured", "source", "source",
                                                         "source", "source"]
    problems = [p for t in found for p in table_problems(t, root=tmp_path)]
    assert len(problems) == 6, problems
    assert problems[0].startswith("page.md:6: 3.26 is in no source") and "closest: 3.2449" in problems[0]
    assert problems[1].startswith("page.md:6: 85% is in no source")
    assert "page.md:8: a table of numbers (2.5, ...)" in problems[2]
    assert "missing.json does not exist" in problems[3]
    assert "running/x.json is a sweep still being written" in problems[4]
    assert "unknown option(s) scales" in problems[5]
