"""Errors that gen3d reports to the user as one clear message (no traceback)."""

from __future__ import annotations

from typing import Any


class Gen3DError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(Gen3DError):
    """A recipe or command-line setting is wrong: names the file, key path and what was expected."""


class DataError(Gen3DError):
    """An input file (image, camera file, mesh) is missing or unreadable."""


class TrainingDiverged(Gen3DError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class PluginError(Gen3DError):
    """A plugin raised while gen3d called it: names the plugin, its component and what was being done."""


def call_plugin(component: Any, doing: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, with any exception but gen3d's own turned into a PluginError
    that names the component's plugin (the traceback stays attached for ``--debug``)."""
    try:
        return function(*args, **kwargs)
    except (Gen3DError, KeyboardInterrupt):
        raise
    except Exception as exc:
        package = f" (package {component.package})" if getattr(component, "package", "") else ""
        where = f"{component.kind} {component.name!r} from plugin {component.plugin or '?'}{package}"
        raise PluginError(f"{where} failed while {doing}: {type(exc).__name__}: {exc}") from exc

