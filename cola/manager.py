"""The plugin manager: loads plugins, collects their strategies, calls their notification hooks.

The rest of the library calls the typed methods of :class:`PluginManager`, never
``pm.hook.*`` directly. Plugins come from the ``cola`` entry-point group (the built-in ones
in ``cola_plugins`` too, through this package's own entry points), or from
:meth:`PluginManager.register`. ``COLA_DISABLE_PLUGIN_AUTOLOAD=1`` loads only this
distribution's own entry points (the built-ins), no third-party ones. ``COLA_TRACE_PLUGINS=1``
logs every hook call.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownStrategyError, closest
from .strategies import PROTOCOLS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cola"
DISTRIBUTION = "chain-of-lora"
DISABLE_AUTOLOAD_ENV = "COLA_DISABLE_PLUGIN_AUTOLOAD"
TRACE_ENV = "COLA_TRACE_PLUGINS"

#: strategy kind (a ChainConfig field) -> the registry hook that collects it
REGISTRY_HOOKS = {
    "merge_policy": "cola_register_merge_policies",
    "rank_schedule": "cola_register_rank_schedules",
    "reinit": "cola_register_reinit_strategies",
    "merge_rule": "cola_register_merge_rules",
    "optimizer_policy": "cola_register_optimizer_policies",
    "lr_policy": "cola_register_lr_policies",
}
NOTIFICATION_HOOKS = ("cola_after_step", "cola_before_merge", "cola_after_merge")


@dataclass(frozen=True)
class Registration:
    """One strategy as registered: its name, factory and the plugin that registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass
class PluginInfo:
    """What ``cola plugins`` shows about one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    strategies: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


class PluginManager:
    """Typed façade over a ``pluggy.PluginManager`` for the ``cola`` project."""

    def __init__(self, load_entry_points: bool = True):
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self.failed: dict[str, str] = {}  # plugin name -> why it could not be loaded
        self._registry: dict[str, dict[str, Registration]] | None = None
        self._lock = threading.Lock()
        if _truthy(os.environ.get(TRACE_ENV)):
            self._pm.trace.root.setwriter(lambda msg: log.info("plugin trace: %s", msg.rstrip()))
            self._pm.enable_tracing()
        if load_entry_points:
            self.load_entry_points()

    # ------------------------------------------------------------------ loading
    def load_entry_points(self) -> None:
        """Register every plugin of the ``cola`` entry-point group (only the built-ins if disabled)."""
        only_builtin = _truthy(os.environ.get(DISABLE_AUTOLOAD_ENV))
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = ep.dist.name if ep.dist else None
            if only_builtin and dist != DISTRIBUTION:
                log.debug("skipping plugin %s (%s=1)", ep.name, DISABLE_AUTOLOAD_ENV)
                continue
            name = ep.name if dist == DISTRIBUTION else f"{dist}:{ep.name}"
            if self._pm.get_plugin(name) is not None or name in self.failed:
                continue
            try:
                plugin = ep.load()
            except Exception as err:  # a broken plugin must not stop the others
                self.failed[name] = f"{type(err).__name__}: {err}"
                self._dists[name] = (dist, ep.dist.version if ep.dist else None)
                log.warning("plugin %s (%s) failed to load: %s", name, ep.value, err)
                continue
            self.register(plugin, name, distribution=dist, version=ep.dist.version if ep.dist else None)

    def register(self, plugin: object, name: str | None = None, distribution: str | None = None,
                 version: str | None = None) -> str:
        """Register a plugin object or module; returns its name. Misspelt hooks are errors."""
        try:
            name = self._pm.register(plugin, name)
        except ValueError as err:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {err}") from None
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as err:
            self._pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} implements an unknown hook: {err}") from None
        self._dists[name] = (distribution, version)
        self._registry = None
        return name

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._dists.pop(name, None)
        self._registry = None

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self._pm.list_name_plugin()]

    # ------------------------------------------------------------------ strategies
    def _collect(self) -> dict[str, dict[str, Registration]]:
        with self._lock:
            if self._registry is not None:
                return self._registry
            registry: dict[str, dict[str, Registration]] = {kind: {} for kind in REGISTRY_HOOKS}
            for kind, hook_name in REGISTRY_HOOKS.items():
                hook = getattr(self._pm.hook, hook_name)
                # pluggy calls the last registered first; registration order reads better here
                for impl in hook.get_hookimpls():
                    plugin_name = impl.plugin_name

                    def register(name, factory, _kind=kind, _plugin=plugin_name):
                        self._add(registry, _kind, name, factory, _plugin)

                    try:
                        impl.function(register=register)
                    except PluginError:
                        raise
                    except Exception as err:
                        raise PluginError(f"plugin {plugin_name!r} raised in hook {hook_name}: "
                                          f"{type(err).__name__}: {err}") from err
            self._registry = registry
            return registry

    @staticmethod
    def _add(registry, kind: str, name: Any, factory: Any, plugin: str) -> None:
        hook = REGISTRY_HOOKS[kind]
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} under {name!r} in {hook}: names are non-empty strings")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} with a factory that is not "
                              f"callable ({type(factory).__name__}) in {hook}")
        existing = registry[kind].get(name)
        if existing is not None:
            raise PluginError(f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by "
                              f"plugin {plugin!r}; rename one of them")
        registry[kind][name] = Registration(kind, name, factory, plugin)

    def strategies(self, kind: str) -> dict[str, Registration]:
        """Every registered strategy of ``kind`` (a ChainConfig field such as ``"reinit"``)."""
        if kind not in REGISTRY_HOOKS:
            raise UnknownStrategyError(f"unknown strategy kind {kind!r}; kinds: {', '.join(REGISTRY_HOOKS)}")
        return dict(self._collect()[kind])

    def lookup(self, kind: str, name: str) -> Registration:
        known = self.strategies(kind)
        if name not in known:
            near = closest(str(name), known)
            raise UnknownStrategyError(
                f"unknown {kind} {name!r}; closest: {', '.join(near)}; known: "
                + ", ".join(f"{n} ({r.plugin})" for n, r in sorted(known.items())))
        return known[name]

    def create(self, kind: str, name: str, config: Any, options: dict[str, Any] | None = None) -> Any:
        """Build strategy ``name`` of ``kind`` with ``factory(config, **options)``, checking what it returns."""
        reg = self.lookup(kind, name)
        try:
            strategy = reg.factory(config, **(options or {}))
        except TypeError as err:
            raise UnknownStrategyError(f"{kind} {name!r} (plugin {reg.plugin!r}) rejected options "
                                       f"{options or {}}: {err}") from None
        except PluginError:
            raise
        except Exception as err:
            if isinstance(err, ValueError):  # strategies report bad options as ConfigError/ValueError
                raise
            raise PluginError(f"{kind} {name!r} (plugin {reg.plugin!r}) failed to build: "
                              f"{type(err).__name__}: {err}") from err
        _, method = PROTOCOLS[kind]
        if not callable(getattr(strategy, method, None)):
            raise PluginError(f"{kind} {name!r} (plugin {reg.plugin!r}): its factory returned a "
                              f"{type(strategy).__name__}, which has no {method}() method")
        return strategy

    # ------------------------------------------------------------------ notifications
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a notification hook on every plugin that implements it, naming the plugin on error."""
        hook = getattr(self._pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except Exception as err:
                raise PluginError(f"plugin {impl.plugin_name!r} raised in hook {hook_name}: "
                                  f"{type(err).__name__}: {err}") from err

    def has_impls(self, hook_name: str) -> bool:
        return bool(getattr(self._pm.hook, hook_name).get_hookimpls())

    # ------------------------------------------------------------------ listing
    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin (loaded or failed), its distribution and version, hooks and strategies."""
        infos: dict[str, PluginInfo] = {}
        for name, plugin in self._pm.list_name_plugin():
            dist, version = self._dists.get(name, (None, None))
            hooks = sorted(h.name for h in self._pm.get_hookcallers(plugin) or [])
            infos[name] = PluginInfo(name, dist, version, hooks)
        for name, why in self.failed.items():
            dist, version = self._dists.get(name, (None, None))
            infos[name] = PluginInfo(name, dist, version, error=why)
        try:
            registry = self._collect()
        except PluginError as err:
            log.warning("%s", err)
            registry = {}
        for kind, regs in registry.items():
            for reg in regs.values():
                infos[reg.plugin].strategies.setdefault(kind, []).append(reg.name)
        return list(infos.values())


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, built lazily once (``refresh=True`` rebuilds it)."""
    global _manager
    with _manager_lock:
        if _manager is None or refresh:
            _manager = PluginManager()
        return _manager
