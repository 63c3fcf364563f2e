"""The plugin system: third-party entry points, errors that name plugins, and the meta-tests."""

import ast
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import cola
from cola import hookspecs
from cola.manager import REGISTRY_HOOKS
from helpers import batches, make_chain, train

EXAMPLE = Path(__file__).parent / "example_plugin"
TESTS = Path(__file__).parent


def install_metadata(site: Path, project: dict, module_dir: Path | None = None) -> None:
    """Put a distribution's metadata (as pip would) on a folder that is on sys.path."""
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = project.get("entry-points", {}).get("cola", {})
    (info / "entry_points.txt").write_text("[cola]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    if module_dir is not None:
        for f in module_dir.glob("*.py"):
            (site / f.name).write_text(f.read_text())


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    install_metadata(tmp_path, project, EXAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cola_halving", None)


def test_third_party_plugin_from_an_entry_point_is_usable_by_name(example_installed):
    pm = cola.PluginManager()
    reg = pm.lookup("rank_schedule", "halving")
    assert reg.plugin == "cola-halving:halving"
    info = {i.name: i for i in pm.plugin_infos()}["cola-halving:halving"]
    assert info.version == "1.0.0" and info.strategies == {"rank_schedule": ["halving"]}
    cfg = cola.ChainConfig(total_steps=9, links=3, rank_schedule="halving")
    model, chain = make_chain(cfg, rank=4, pm=pm)
    train(model, chain, batches(9))
    assert chain.planned_ranks() == [4, 2, 1]
    assert chain.layers["fc1"].rank == 1


def test_disable_autoload_keeps_only_the_builtins(example_installed, monkeypatch):
    monkeypatch.setenv("COLA_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = cola.PluginManager()
    assert "halving" not in pm.strategies("rank_schedule")
    assert "constant" in pm.strategies("rank_schedule")


def test_a_plugin_that_fails_to_import_is_reported_and_others_load(tmp_path, monkeypatch):
    install_metadata(tmp_path, {"name": "broken-plugin", "version": "0.1",
                                "entry-points": {"cola": {"broken": "does_not_exist_module"}}})
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = cola.PluginManager()
    assert "ModuleNotFoundError" in pm.failed["broken-plugin:broken"]
    assert "even" in pm.strategies("merge_policy")
    infos = {i.name: i for i in pm.plugin_infos()}
    assert infos["broken-plugin:broken"].error


def test_duplicate_names_name_both_plugins(pm):
    class Dup:
        @cola.hookimpl
        def cola_register_reinit_strategies(self, register):
            register("lora", lambda config: None)

    pm.register(Dup(), "dup-plugin")
    try:
        with pytest.raises(cola.PluginError, match=r"reinit 'lora' is registered twice: by plugin "
                                                   r"'reinit_strategies' and by plugin 'dup-plugin'"):
            pm.strategies("reinit")
    finally:
        pm.unregister("dup-plugin")


def test_misspelt_hook_is_an_error():
    class Typo:
        @cola.hookimpl
        def cola_register_merge_polices(self, register):
            pass

    with pytest.raises(cola.PluginError, match="unknown hook"):
        cola.PluginManager(load_entry_points=False).register(Typo(), "typo")


def test_factory_returning_the_wrong_type_is_rejected(pm):
    class Wrong:
        @cola.hookimpl
        def cola_register_merge_rules(self, register):
            register("wrong", lambda config: 42)
            register("not-callable", 3)

    pm.register(Wrong(), "wrong-plugin")
    try:
        with pytest.raises(cola.PluginError, match="not callable"):
            pm.strategies("merge_rule")
    finally:
        pm.unregister("wrong-plugin")

    class Wrong2:
        @cola.hookimpl
        def cola_register_merge_rules(self, register):
            register("wrong", lambda config: 42)

    pm.register(Wrong2(), "wrong-plugin")
    try:
        with pytest.raises(cola.PluginError, match=r"'wrong' \(plugin 'wrong-plugin'\).*int, which has no factors"):
            pm.create("merge_rule", "wrong", cola.ChainConfig(total_steps=1, links=1))
    finally:
        pm.unregister("wrong-plugin")


def test_exception_in_a_notification_hook_names_plugin_and_hook(pm):
    class Boom:
        @cola.hookimpl
        def cola_after_merge(self, chain, report):
            raise RuntimeError("boom")

    pm.register(Boom(), "boom-plugin")
    try:
        model, chain = make_chain(cola.ChainConfig(total_steps=4, links=2), pm=pm)
        with pytest.raises(cola.PluginError, match="plugin 'boom-plugin' raised in hook cola_after_merge: RuntimeError: boom"):
            train(model, chain, batches(4))
    finally:
        pm.unregister("boom-plugin")


def test_exception_in_a_registry_hook_names_plugin_and_hook(pm):
    class Boom:
        @cola.hookimpl
        def cola_register_lr_policies(self, register):
            raise KeyError("x")

    pm.register(Boom(), "boom-plugin")
    try:
        with pytest.raises(cola.PluginError, match="'boom-plugin' raised in hook cola_register_lr_policies"):
            pm.strategies("lr_policy")
    finally:
        pm.unregister("boom-plugin")


def test_plugin_strategies_of_every_kind_drive_a_chain(pm):
    """A plugin object registering a merge policy and an optimizer policy, used by name."""
    calls = []

    class FirstStepThenNever:
        def __init__(self, config):
            pass

        def is_knot(self, info):
            return info.step == 1

    class Counting:
        def __init__(self, config, tag="x"):
            self.tag = tag

        def apply(self, optimizer, params, info):
            calls.append((self.tag, info.step, info.link))

    class Plugin:
        @cola.hookimpl
        def cola_register_merge_policies(self, register):
            register("first-step", FirstStepThenNever)

        @cola.hookimpl
        def cola_register_optimizer_policies(self, register):
            register("counting", Counting)

    pm.register(Plugin(), "custom")
    try:
        cfg = cola.ChainConfig(total_steps=3, merge_policy="first-step", optimizer_policy="counting",
                               optimizer_policy_options={"tag": "t"})
        model, chain = make_chain(cfg, pm=pm)
        train(model, chain, batches(3))
    finally:
        pm.unregister("custom")
    assert calls == [("t", 1, 1)] and [r.step for r in chain.history] == [1]


def test_global_manager_is_built_once():
    assert cola.get_plugin_manager() is cola.get_plugin_manager()


def test_cola_plugins_command_lists_plugins_versions_and_strategies():
    out = subprocess.run([sys.executable, "-m", "cola", "plugins"], capture_output=True, text=True, check=True).stdout
    assert "reinit_strategies  (chain-of-lora" in out
    assert "reinit: lora, gaussian, pissa, rac, orthogonal" in out
    assert "merge_policy: even, knots, every, plateau" in out


# ---------------------------------------------------------------- meta-tests
HOOKS = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cola_")]


def test_the_registry_hooks_cover_every_strategy_kind():
    assert set(REGISTRY_HOOKS.values()) <= set(HOOKS)
    assert set(REGISTRY_HOOKS) == set(cola.config.STRATEGY_KINDS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith("."), f"{hook}: first docstring line must be a one-line summary"
    assert "Called" in doc, f"{hook}: say when it is called"
    for param in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f":param {param}:" in doc, f"{hook}: parameter {param} is not documented"
    readme = Path(__file__).parents[1] / "README.md"
    assert hook in readme.read_text(), f"{hook} is not in the README's plugin guide"


def hook_uses(source: str) -> set[str]:
    """The names that ``source`` really uses as hooks: functions decorated with a ``hookimpl``
    (``@cola.hookimpl``, ``@hookimpl``, ``@hookimpl(...)``) and ``<...>.hook.<name>`` references
    (``pm.hook.cola_after_step(...)``). Comments, strings and docstrings do not count."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if name == "hookimpl":
                    used.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "hook":
            used.add(node.attr)
    return used


def test_hook_uses_ignore_comments_strings_and_undecorated_functions():
    source = '''
# cola_after_step is tested elsewhere
"""cola_before_merge"""
match = "raised in hook cola_after_merge"
def cola_register_merge_rules(register): pass
class P:
    @cola.hookimpl
    def cola_register_lr_policies(self, register): pass
@hookimpl(tryfirst=True)
def cola_register_rank_schedules(register): pass
pm.hook.cola_register_reinit_strategies(register=print)
'''
    assert hook_uses(source) == {"cola_register_lr_policies", "cola_register_rank_schedules",
                                 "cola_register_reinit_strategies"}


TEST_SOURCES = sorted({*TESTS.rglob("*.py"), *EXAMPLE.glob("*.py")})
USED_HOOKS = set().union(*(hook_uses(p.read_text()) for p in TEST_SOURCES))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_test(hook):
    """A hook counts as tested when test code implements it (a hookimpl-decorated function of its name,
    in a test module, a helper, or the example plugin the entry-point tests install) or calls it
    through ``pm.hook``; a mention in a comment or a string does not count."""
    assert hook in USED_HOOKS, f"no test implements or calls {hook}"
