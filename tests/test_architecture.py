"""The shape of the code base: imports flow one way, modules and functions stay readable.

* The import graph of the project's modules (``cola``, ``cola_plugins`` from ``plugins/``,
  ``cola_theory`` from ``theory/``) has no cycle, counting imports inside functions too.
* It flows one way: core -> plugins / theory -> llm -> command line. The core never imports the
  plugins, the theory, the LLM layer or a command-line module; the plugins and the theory never
  import the LLM layer; nothing but a command-line module imports a command-line module.
* Inside functions only optional heavy packages are imported (transformers, datasets, matplotlib,
  ...), never a module of the project and never a light standard-library module.
* Inside the LLM layer, floor by floor (:data:`LLM_FLOORS`): the basics, the tasks (``cola.llm.tasks`` and the
  objective), one experiment, the sweep (``cola.llm.sweep``); a module imports only its own floor or lower ones.
  No module of ``cola/llm/`` outside its packages is named ``sweep_*``, ``facts*`` or ``corpus*``, and no
  ``settings.task ==`` branch lives outside ``cola/llm/tasks/``.
* No module in ``cola/`` is longer than 500 lines and no function longer than 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cola": ROOT / "cola", "cola_plugins": ROOT / "plugins", "cola_theory": ROOT / "theory"}
CLI = {"cola.cli", "cola.__main__", "cola.llm.cli", "cola.llm.sweep.cli", "cola_theory.cli"}
#: what a function may import lazily: packages that are optional (extras) or slow to import
LAZY_OK = ("transformers", "datasets", "matplotlib", "tqdm", "peft", "safetensors", "gguf", "yaml", "pandas",
           "pyarrow", "torch.distributed", "torch.nn.parallel", "accelerate", "scipy")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents or path.parent == folder:
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(path)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for folder in PACKAGES.values():
        for path in sorted(folder.rglob("*.py")):
            found[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> str:
    """The project module an import statement names (a submodule when ``from pkg import sub``)."""
    if isinstance(node, ast.Import):
        return alias.name
    base = node.module or ""
    if node.level:
        package = module if MODULES[module][0].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    full = f"{base}.{alias.name}"
    return full if full in MODULES else base


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported name, inside a function, line)`` for every import statement of ``module``."""
    tree = MODULES[module][1]
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                out.append((_target(module, node, alias), id(node) in in_function, node.lineno))
    return out


def _project(name: str) -> str | None:
    """The project module ``name`` resolves to (its longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for name, _, _ in _imports(module):
            target = _project(name)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def _layer(module: str) -> str:
    if module in CLI:
        return "cli"
    if module.startswith("cola.llm"):
        return "llm"
    if module.startswith("cola_plugins"):
        return "plugins"
    if module.startswith("cola_theory"):
        return "theory"
    return "core"


ALLOWED = {"core": {"core"}, "plugins": {"core", "plugins"}, "theory": {"core", "plugins", "theory"},
           "llm": {"core", "plugins", "theory", "llm"}, "cli": {"core", "plugins", "theory", "llm", "cli"}}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_flow_one_way():
    wrong = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in _graph().items() for t in targets
             if _layer(t) not in ALLOWED[_layer(m)]]
    assert not wrong, "\n".join(wrong)


#: the floors of the LLM layer, lowest first; a module not named is on the experiment's floor
LLM_BASICS = {"cola.llm.models", "cola.llm.divergence", "cola.llm.parallel", "cola.llm.performance",
              "cola.llm.tracking", "cola.llm.stats", "cola.llm.lock", "cola.llm.stopping", "cola.llm.config_files",
              "cola.llm.metrics"}


def _floor(module: str) -> int:
    if module in LLM_BASICS:
        return 0
    if module.startswith("cola.llm.tasks") or module == "cola.llm.objective":
        return 1
    if module.startswith("cola.llm.sweep"):
        return 3
    return 2


LLM_FLOORS = ("basics", "tasks", "experiment", "sweep")


def test_the_llm_layer_imports_no_floor_above_its_own():
    wrong = [f"{m} ({LLM_FLOORS[_floor(m)]}) imports {t} ({LLM_FLOORS[_floor(t)]})"
             for m, targets in _graph().items() if _layer(m) == "llm" for t in targets
             if _layer(t) == "llm" and _floor(t) > _floor(m)]
    assert not wrong, "\n".join(wrong)


def test_the_llm_layer_keeps_its_families_in_packages():
    flat = sorted(p.name for p in (ROOT / "cola" / "llm").glob("*.py")
                  if p.name.startswith(("sweep_", "facts", "corpus")))
    assert not flat, f"modules of cola/llm/ that belong in cola/llm/sweep/ or cola/llm/tasks/: {flat}"
    for package in ("sweep", "tasks"):
        doc = ast.get_docstring(MODULES[f"cola.llm.{package}"][1])
        assert doc and len(doc.splitlines()) >= 2, f"cola/llm/{package}/__init__.py: say what it holds"
    branches = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "cola").rglob("*.py"))
                if (ROOT / "cola" / "llm" / "tasks") not in p.parents
                for i, line in enumerate(p.read_text().splitlines(), 1)
                if "task ==" in line or "task in (" in line or '.get("task") ==' in line]
    assert not branches, "a branch on the kind of task outside cola/llm/tasks/: " + ", ".join(branches)


def test_functions_import_only_optional_heavy_packages():
    wrong = []
    for module in MODULES:
        for name, lazy, line in _imports(module):
            if lazy and (_project(name) is not None or not name.startswith(LAZY_OK)):
                wrong.append(f"{MODULES[module][0].relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_cycle_and_a_lazy_project_import():
    tree = ast.parse("def f():\n    from cola.llm import report\n")
    node = tree.body[0].body[0]
    assert _target("cola.chain", node, node.names[0]) == "cola.llm.report"
    assert _layer("cola.chain") == "core" and "llm" not in ALLOWED["core"]


def test_no_module_of_cola_is_longer_than_500_lines():
    long = {str(p.relative_to(ROOT)): n for m, (p, _) in MODULES.items() if m.startswith("cola.")
            and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_of_cola_is_longer_than_80_lines():
    long = []
    for module, (path, tree) in MODULES.items():
        if not (module == "cola" or module.startswith("cola.")):
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = fn.end_lineno - fn.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_test_schedulers_named_units_exist():
    """tests/conftest.py's FIRST (handed out first) and SPREAD_MODULES name modules and tests that exist: a renamed
    test would silently fall out of the order."""
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    named = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in ("FIRST", "SPREAD_MODULES")}
    assert set(named) == {"FIRST", "SPREAD_MODULES"}
    for unit in [*named["FIRST"], *named["SPREAD_MODULES"]]:
        module, _, test = unit.partition("::")
        assert (ROOT / module).is_file(), unit
        if test:
            assert module in named["SPREAD_MODULES"], f"{unit}: a single test is a unit only in a spread module"
            assert f"def {test}(" in (ROOT / module).read_text(), unit
