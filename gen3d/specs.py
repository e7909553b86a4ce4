"""The small spec a component hook yields: name, factory and typed config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Callable

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

# Kind name -> hook that provides it. The hook name is the single source of truth for kinds.
KIND_HOOKS = {
    "representation": "gen3d_representations",
    "guidance": "gen3d_guidance",
    "preprocessor": "gen3d_preprocessors",
    "dataset": "gen3d_datasets",
    "exporter": "gen3d_exporters",
    "loop": "gen3d_loops",
}


@dataclass(frozen=True)
class Component:
    """One named component a plugin contributes.

    ``factory(config, **context)`` builds it from an instance of ``config`` (a dataclass whose
    fields are the component's recipe settings; its defaults when the recipe gives none), or
    from ``None`` when the component takes no settings. What ``context`` holds depends on the
    kind: see each hook in :mod:`gen3d.hookspecs`.
    """

    name: str
    factory: Callable[..., Any]
    config: type | None = None
    description: str = ""
    # Representations: the capabilities their fields have ("radiance", "surface", "trainable",
    # "refit"; see gen3d.fields). Loops: the capabilities they need of their representation.
    provides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    # Filled in by the plugin manager: which plugin provided it and of what kind.
    kind: str = field(default="", compare=False)
    plugin: str = field(default="", compare=False)
    package: str = field(default="", compare=False)  # the distribution that installed it, with its version

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"component name {self.name!r} must be lower-case letters, digits, '-', '_' or '.'")
        if self.config is not None and not is_dataclass(self.config):
            raise TypeError(f"component {self.name!r}: config must be a dataclass type, got {self.config!r}")
