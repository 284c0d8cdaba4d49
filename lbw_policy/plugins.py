"""The plugin manager and the registry of detector and actuator classes.

Built-ins (``lbw_policy.detectors``, ``lbw_policy.actuators``) are registered as default plugins
through the same pluggy manager as third-party ones. Third-party plugins load from the
``lbw_policy`` entry-point group unless the environment variable ``LBW_POLICY_LOAD_PLUGINS``
says otherwise: unset loads every entry point, an empty value loads none (the test suite sets
this), a comma-separated list loads only those entry-point names.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional

import pluggy

from lbw_policy import hookspecs
from lbw_policy.base import API_VERSION, REDUCTIONS, Actuator, Detector
from lbw_policy.errors import PluginError

__all__ = [
    "Registration",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "unregister_plugin",
    "reset",
]

ENTRY_POINT_GROUP = "lbw_policy"
DEFAULT_PLUGINS = ("lbw_policy.detectors", "lbw_policy.actuators")

_lock = threading.RLock()
_pm: Optional[pluggy.PluginManager] = None
_registry: Optional["Registry"] = None


@dataclass(frozen=True)
class Registration:
    """One registered class: its ``name``, ``kind`` (detector | actuator), the class, and the
    plugin (pluggy name) and version that provided it."""

    name: str
    kind: str
    cls: type
    plugin: str
    version: str


@dataclass
class Registry:
    """Every detector and actuator class known to the plugin manager, by name."""

    detectors: dict
    actuators: dict

    def detector(self, name: str) -> Registration:
        return self.detectors[name]

    def actuator(self, name: str) -> Registration:
        return self.actuators[name]

    def versions(self) -> dict:
        """``{plugin_name: version}`` for every plugin that registered something."""
        out = {}
        for reg in list(self.detectors.values()) + list(self.actuators.values()):
            out[reg.plugin] = reg.version
        return dict(sorted(out.items()))


def _package_version() -> str:
    from lbw_policy import __version__

    return __version__


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide :class:`pluggy.PluginManager`, built on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("lbw_policy")
            pm.add_hookspecs(hookspecs)
            for modname in DEFAULT_PLUGINS:
                mod = importlib.import_module(modname)
                pm.register(mod, name=modname)
            setting = os.environ.get("LBW_POLICY_LOAD_PLUGINS")
            if setting is None:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            elif setting.strip():
                wanted = [n.strip() for n in setting.split(",") if n.strip()]
                known = {ep.name for ep in importlib.metadata.entry_points(
                    group=ENTRY_POINT_GROUP)}
                missing = [n for n in wanted if n not in known]
                if missing:
                    raise PluginError(
                        f"LBW_POLICY_LOAD_PLUGINS names {missing}, which no installed package "
                        f"provides in the {ENTRY_POINT_GROUP!r} entry-point group; installed: "
                        f"{sorted(known) or 'none'}", plugin=missing[0])
                for name in wanted:
                    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            _pm = pm
        return _pm


def register_plugin(plugin: Any, name: Optional[str] = None) -> str:
    """Register a plugin object (module or instance with ``@hookimpl`` functions) in code.

    :param plugin: the plugin object.
    :param name: its name in the decision log (default: pluggy's, the module name or object id).
    :return: the name it was registered under.
    :raises PluginError: when a class it registers clashes with one already registered
        (the plugin is unregistered again, nothing changes), or when the plugin name or object
        is already registered.
    """
    pm = get_plugin_manager()
    with _lock:
        try:
            registered = pm.register(plugin, name=name)
        except ValueError:  # pluggy: that name or that object is already registered
            raise PluginError(f"plugin {name or plugin!r}: that name or that object is already "
                              "registered; unregister it first or choose another name",
                              plugin=name) from None
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is already registered or blocked", plugin=name)
        try:
            _build_registry(pm)
        except PluginError:
            pm.unregister(plugin)
            raise
        global _registry
        _registry = None
        return registered


def unregister_plugin(plugin_or_name: Any) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    pm = get_plugin_manager()
    with _lock:
        if isinstance(plugin_or_name, str):
            pm.unregister(name=plugin_or_name)
        else:
            pm.unregister(plugin_or_name)
        global _registry
        _registry = None


def reset() -> None:
    """Forget the plugin manager and registry (tests; after changing LBW_POLICY_LOAD_PLUGINS)."""
    global _pm, _registry
    with _lock:
        _pm = None
        _registry = None


def get_registry() -> Registry:
    """The registry of every loaded plugin's classes (built once, cached).

    :raises PluginError: duplicate names, or a registered object that is not a proper
        :class:`~lbw_policy.base.Detector` / :class:`~lbw_policy.base.Actuator` subclass.
    """
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build_registry(get_plugin_manager())
        return _registry


def _plugin_versions(pm: pluggy.PluginManager) -> dict:
    versions = {}
    for plugin, dist in pm.list_plugin_distinfo():
        versions[pm.get_name(plugin)] = dist.version
    return versions


#: The methods whose arguments changed in plugin API version 2, and how many positional
#: parameters (self included) each takes now.
_V2_ARITY = {"detector": {"setup": 4}, "actuator": {"bind": 2, "before_step": 3, "after_step": 4}}
_V2_CALLS = {"detector": "setup(model, optimizer, every)",
             "actuator": "bind(context), before_step(optimizer, step), "
                         "after_step(optimizer, stepped, step)"}


def _v1_methods(cls: type) -> list:
    """Methods a class overrides with the version-1 arguments (``name(args)``), if any."""
    kind = "detector" if issubclass(cls, Detector) else "actuator"
    out = []
    for name, arity in _V2_ARITY[kind].items():
        fn = getattr(cls, name, None)
        if fn is None or fn is getattr(Detector if kind == "detector" else Actuator, name):
            continue
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            continue
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < arity:
            out.append(f"{name}({', '.join(p.name for p in positional[1:])})")
    return out


def _build_registry(pm: pluggy.PluginManager) -> Registry:
    dist_versions = _plugin_versions(pm)
    registry = Registry(detectors={}, actuators={})
    for hook_name, kind, base, table in (
        ("register_detectors", "detector", Detector, registry.detectors),
        ("register_actuators", "actuator", Actuator, registry.actuators),
    ):
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name
            if plugin_name in DEFAULT_PLUGINS:
                default_version = _package_version()
            else:
                default_version = dist_versions.get(plugin_name) or str(
                    getattr(impl.plugin, "__version__", "unknown"))

            def register(cls: type, _plugin: str = plugin_name, _version: str = default_version,
                         _kind: str = kind, _base: type = base, _table: dict = table) -> None:
                if not (isinstance(cls, type) and issubclass(cls, _base)):
                    raise PluginError(
                        f"plugin {_plugin!r} registered {cls!r} as a {_kind}; expected a subclass "
                        f"of lbw_policy.{_base.__name__}", plugin=_plugin)
                api = getattr(cls, "api_version", None)
                old = _v1_methods(cls) if isinstance(cls, type) else []
                if old:
                    raise PluginError(
                        f"plugin {_plugin!r} registered {_kind} class {cls.__qualname__} written "
                        f"for plugin API version 1: {', '.join(old)}; version {API_VERSION} "
                        f"passes {_V2_CALLS[_kind]} (docs/plugins.md, 'Plugin API version 2')",
                        plugin=_plugin)
                if api != API_VERSION:
                    raise PluginError(
                        f"plugin {_plugin!r} registered {_kind} class {cls.__qualname__} written "
                        f"for plugin API version {api!r}; this lbw-policy implements version "
                        f"{API_VERSION} (docs/plugins.md lists the changes)", plugin=_plugin)
                bad = {s: r for s, r in (getattr(cls, "reductions", None) or {}).items()
                       if r not in REDUCTIONS}
                if bad or getattr(cls, "default_reduction", "mean") not in REDUCTIONS:
                    raise PluginError(
                        f"plugin {_plugin!r}: {_kind} class {cls.__qualname__} declares unknown "
                        f"reductions {bad or cls.default_reduction!r}; expected one of "
                        f"{', '.join(REDUCTIONS)}", plugin=_plugin)
                name = getattr(cls, "name", "")
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {_plugin!r} registered {_kind} class {cls.__qualname__} with no "
                        f"`name`; set the class attribute `name = \"...\"`", plugin=_plugin)
                if name in _table:
                    other = _table[name]
                    raise PluginError(
                        f"{_kind} name {name!r} registered twice: by plugin {other.plugin!r} "
                        f"({other.cls.__module__}.{other.cls.__qualname__}) and by plugin "
                        f"{_plugin!r} ({cls.__module__}.{cls.__qualname__}); rename one",
                        plugin=_plugin)
                _table[name] = Registration(name=name, kind=_kind, cls=cls, plugin=_plugin,
                                            version=str(cls.version or _version))

            impl.function(register=register)
    return registry
