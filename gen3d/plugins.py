"""The plugin manager: loads entry points and answers "which component is called X of kind K"."""

from __future__ import annotations

import difflib
import importlib.metadata
from dataclasses import dataclass, replace
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import ConfigError, Gen3DError
from .specs import KIND_HOOKS, Component

ENTRY_POINT_GROUP = "gen3d"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    module: str
    components: tuple[Component, ...]


class Registry:
    """All components the loaded plugins provide, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, versions: dict[str, str], packages: dict[str, str] | None = None):
        self.pm = pm
        self.versions = versions
        packages = packages or {}
        self._by_kind: dict[str, dict[str, Component]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
                for component in impl.function() or ():
                    self._add(replace(component, kind=kind, plugin=plugin_name,
                                      package=packages.get(plugin_name, "registered in this process")))

    def _add(self, component: Component) -> None:
        known = self._by_kind[component.kind]
        if component.name in known:
            other = known[component.name].plugin
            raise Gen3DError(
                f"two plugins provide the {component.kind} {component.name!r}: "
                f"{other!r} and {component.plugin!r}; uninstall one of them"
            )
        known[component.name] = component

    @property
    def hooks(self):
        """The hook relay: ``registry.hooks.gen3d_on_step(run=..., step=..., metrics=...)``."""
        return self.pm.hook

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def get(self, kind: str, name: str, where: str = "") -> Component:
        """The component, or a ConfigError that lists the known names of that kind."""
        if kind not in self._by_kind:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {sorted(self._by_kind)}")
        try:
            return self._by_kind[kind][name]
        except KeyError:
            known = self.names(kind)
            hint = difflib.get_close_matches(str(name), known, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}unknown {kind} {name!r}.{did_you_mean} Known {kind}s: "
                f"{', '.join(known) or '(none installed)'}"
            ) from None

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            components = tuple(c for kind in self._by_kind.values() for c in kind.values() if c.plugin == name)
            module = getattr(plugin, "__name__", repr(plugin))
            infos.append(PluginInfo(name, self.versions.get(name, "?"), module, components))
        return infos


def make_plugin_manager(extra_plugins: tuple[ModuleType | object, ...] = (), entry_points: bool = True):
    """A fresh plugin manager with the entry-point plugins (and any extra ones) registered."""
    pm = pluggy.PluginManager("gen3d")
    pm.add_hookspecs(hookspecs)
    versions: dict[str, str] = {}
    packages: dict[str, str] = {}
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others' names
                raise Gen3DError(f"could not load gen3d plugin {ep.name!r} ({ep.value}): {exc}") from exc
            pm.register(plugin, name=ep.name)
            versions[ep.name] = ep.dist.version if ep.dist else "?"
            packages[ep.name] = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
    for plugin in extra_plugins:
        name = pm.register(plugin)
        versions[name] = getattr(plugin, "__version__", "?")
    # A hookimpl whose name matches no hookspec (a typo) is an error, not silently ignored.
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise Gen3DError(f"a gen3d plugin implements an unknown hook: {exc}") from exc
    return pm, versions, packages


_registry: Registry | None = None
_extra: list = []


def register(plugin: ModuleType | object) -> None:
    """Register a plugin object in this process (tests, notebooks); entry points need no call."""
    global _registry
    _extra.append(plugin)
    _registry = None


def unregister_all_extra() -> None:
    global _registry
    _extra.clear()
    _registry = None


def get_registry() -> Registry:
    global _registry
    if _registry is None:
        pm, versions, packages = make_plugin_manager(tuple(_extra))
        _registry = Registry(pm, versions, packages)
    return _registry


def get_component(kind: str, name: str, where: str = "") -> Component:
    return get_registry().get(kind, name, where)
